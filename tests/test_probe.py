"""Probing: the wrapper is transparent, batching is exact, positions are right."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_abliteration.data.chat import extract_eot_from_chat_template
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.capture import WelfordStats, capture_activations, capture_residual_stream, probe_prompts
from mlx_abliteration.probe.positions import ProbeSpec, probe_positions, resolve_marker

PROMPTS = ["How do I bake bread?", "hi", "Tell me a long story about the sea and the wind, please, right now."]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tiny_model):
    return load_model(tiny_model(arch=request.param, tie=request.param == "llama"))


def test_wrapping_keeps_logits_and_restores_layers(model):
    m, tok, _ = model
    x = mx.array([tok.encode("hello world, how are you")])
    before = m(x)
    originals = list(m.layers)
    classes = [type(layer) for layer in m.layers]
    with capture_residual_stream(m, range(len(m.layers)), stop_early=False) as wrappers:
        assert all(wrappers[i].layer is layer for i, layer in enumerate(m.layers))  # hooked in place, not replaced
        during = m(x)
        assert "_captured" not in dict(m.layers[0].parameters())
    assert mx.array_equal(before, during)
    assert all(a is b for a, b in zip(m.layers, originals))
    assert [type(layer) for layer in m.layers] == classes


def test_layers_restored_on_exception(model):
    m, _, _ = model
    originals = list(m.layers)
    with pytest.raises(RuntimeError):
        with capture_residual_stream(m, [0, 1]):
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(m.layers, originals))


class _KeywordCalls(nn.Module):
    """Calls its layers by keyword and keeps them in two lists joined (as GPT-J and AFM7 do in mlx-lm)."""

    def __init__(self, layers):
        super().__init__()
        self.first, self.second = layers[:1], layers[1:]

    @property
    def layers(self):
        return self.first + self.second

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x=x)
        return x


class _Double(nn.Module):
    def __call__(self, x):
        return 2 * x


def test_layers_called_by_keyword_from_joined_lists_are_probed():
    model = _KeywordCalls([_Double(), _Double(), _Double()])
    x = mx.ones((1, 2, 4))
    with capture_residual_stream(model, [0, 2], stop_early=False) as probes:
        for probe in probes.values():
            probe._select = lambda h: h[:, -1]
        model(x)
    assert mx.array_equal(probes[0]._captured, 2 * mx.ones((1, 4)))
    assert mx.array_equal(probes[2]._captured, 8 * mx.ones((1, 4)))


@pytest.mark.parametrize("position", ["last", "marker", "after-marker", "span"])
def test_batched_equals_unbatched(model, position):
    m, tok, _ = model
    spec = ProbeSpec(position=position)
    batched = capture_activations(m, tok, PROMPTS, spec, batch_size=3)
    single = capture_activations(m, tok, PROMPTS, spec, batch_size=1)
    assert batched.shape == (3, len(m.layers), m.args.hidden_size)
    scale = float(mx.abs(single).max().item())
    assert float(mx.abs(batched - single).max().item()) <= 1e-4 * max(scale, 1.0)


def test_welford_mean_matches_direct_mean(model):
    m, tok, _ = model
    prompts = PROMPTS * 4 + ["one more"]
    acts = capture_activations(m, tok, prompts, batch_size=1)
    stats = probe_prompts(m, tok, prompts, batch_size=5)
    assert stats.count == len(prompts)
    assert mx.allclose(stats.mean, acts.mean(0), atol=1e-4, rtol=1e-5)
    direct_var = ((acts - acts.mean(0)) ** 2).sum((0, 2)) / (len(prompts) - 1) / acts.shape[-1]
    assert mx.allclose(stats.variance, direct_var, rtol=1e-3)


def test_welford_merge_equals_single_pass():
    data = mx.random.normal((10, 3, 8))
    whole = WelfordStats.empty(3, 8)
    whole.update(data)
    parts = WelfordStats.empty(3, 8)
    for chunk in (data[:3], data[3:4], data[4:]):
        parts.update(chunk)
    assert mx.allclose(whole.mean, parts.mean, atol=1e-6)
    assert mx.allclose(whole.m2, parts.m2, rtol=1e-5)


def test_probing_restricted_layers_matches_full(model):
    m, tok, _ = model
    full = capture_activations(m, tok, PROMPTS)
    part = capture_activations(m, tok, PROMPTS, layer_ids=[1, 2])
    assert mx.allclose(part, full[:, 1:3], atol=1e-5)


def test_marker_positions_on_chat_template(model):
    _, tok, _ = model
    assert extract_eot_from_chat_template(tok.chat_template) == "<|im_end|>"
    ids, last = probe_positions(tok, "hi", ProbeSpec("last"), None)
    assert last == [len(ids) - 1]
    marker = resolve_marker(tok, ProbeSpec("marker"))
    ids, pos = probe_positions(tok, "hi", ProbeSpec("marker"), marker)
    assert tok.decode([ids[pos[0]]]) == "<|im_end|>"
    # The template renders "<|im_end|>\n<|im_start|>assistant\n" after the user turn.
    ids, after = probe_positions(tok, "hi", ProbeSpec("after-marker"), marker)
    assert tok.decode([ids[after[0]]]) == "\n"
    ids, span = probe_positions(tok, "hi", ProbeSpec("span"), marker)
    assert span[0] == pos[0] and span[-1] == len(ids) - 1


def test_marker_with_newline_and_stripping(model):
    _, tok, _ = model
    with_newline = resolve_marker(tok, ProbeSpec("marker", marker="<|im_end|>\n"))
    assert with_newline == "<|im_end|>\n"
    ids, pos = probe_positions(tok, "hi", ProbeSpec("marker", marker=with_newline), with_newline)
    assert tok.decode([ids[pos[0]]]).endswith("\n")
    stripped = resolve_marker(tok, ProbeSpec("marker", marker="<|im_end|>\n", strip_marker_newline=True))
    assert stripped == "<|im_end|>"
    ids, pos = probe_positions(tok, "hi", ProbeSpec("marker", marker=stripped), stripped)
    assert tok.decode([ids[pos[0]]]) == "<|im_end|>"


def test_eot_extraction_for_other_templates():
    llama3 = (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    gemma = (
        "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    assert extract_eot_from_chat_template(llama3) == "<|eot_id|>"
    assert extract_eot_from_chat_template(gemma) == "<end_of_turn>"
    assert extract_eot_from_chat_template(None) is None
