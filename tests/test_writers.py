"""Residual writers found from what modules do on the model's forward pass, not from their names."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes

from mlx_abliteration.edit.in_memory import apply_plan
from mlx_abliteration.edit.orthogonalize import select_writers, uniform_plan
from mlx_abliteration.errors import UserError
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.writer_discovery import discover_writers
from mlx_abliteration.probe.writers import describe_writers
from tests.support.tiny_models import write_tiny_tokenizer

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    vocab_size=384,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    max_position_embeddings=2048,
)
ARCHS = {
    "llama": {},
    "gemma2": dict(
        query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=64
    ),
    "olmo2": {},
    "phi": dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5),
    "qwen": dict(kv_channels=16, layer_norm_epsilon=1e-5, seq_length=2048, no_bias=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_ctx=2048, n_embd=64, n_head=4, n_layer=2, n_positions=2048, layer_norm_epsilon=1e-5),
}


def _model(model_type: str, seed: int = 0):
    config = dict(BASE, model_type=model_type, **ARCHS[model_type])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    key = mx.random.key(seed)
    params = []
    for name, value in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        noise = mx.random.normal(value.shape, key=sub)
        # Matrices scaled by fan-in (activations stay O(1)); vectors (norm gains, biases) away from their init.
        params.append((name, noise * value.shape[-1] ** -0.5 if value.ndim > 1 else value + 0.1 * noise))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model, config


def _names(writers, layer=0):
    return {w.path.split(f".{layer}.", 1)[1]: w for w in writers.values() if w.layer == layer}


@pytest.mark.parametrize(
    "model_type, attn, mlp, embeds",
    [
        ("llama", "self_attn.o_proj", "mlp.down_proj", {"model.embed_tokens"}),
        ("phi", "self_attn.dense", "mlp.fc2", {"model.embed_tokens"}),  # names the old suffix table missed
        ("qwen", "attn.c_proj", "mlp.c_proj", {"transformer.wte"}),  # w2 reads here: never a writer
        ("mixtral", "self_attn.o_proj", "block_sparse_moe.switch_mlp.down_proj", {"model.embed_tokens"}),
        (
            "gpt2",
            "attn.c_proj",
            "mlp.c_proj",
            {"model.wte", "model.wpe"},
        ),  # position embeddings add into the stream too
    ],
)
def test_writers_found_by_what_they_do(model_type, attn, mlp, embeds):
    model, _ = _model(model_type)
    writers = discover_writers(model, model_type)
    for layer in range(2):
        found = _names(writers, layer)
        assert set(found) == {attn, mlp}, found
        assert found[attn].role == "attn" and found[mlp].role == "mlp"
        assert all(w.norm is None and not w.rows for w in found.values())
    assert {w.path for w in writers.values() if w.layer is None} == embeds
    assert all(w.rows and w.role == "embed" for w in writers.values() if w.layer is None)


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_post_norm_writers_carry_the_norm_gain(model_type):
    model, _ = _model(model_type)
    writers = discover_writers(model, model_type)
    found = _names(writers, 1)
    assert set(found) == {"self_attn.o_proj", "mlp.down_proj"}
    assert found["self_attn.o_proj"].norm.endswith("layers.1.post_attention_layernorm")
    assert found["mlp.down_proj"].norm.endswith("layers.1.post_feedforward_layernorm")
    norm = model.layers[1].post_attention_layernorm
    expected = (1 + norm.weight) if model_type == "gemma2" else norm.weight  # Gemma's norms scale by 1 + w
    gain = found["self_attn.o_proj"].gain
    assert mx.allclose(gain / mx.linalg.norm(gain), expected / mx.linalg.norm(expected), atol=1e-5)


class _Wrapper(nn.Module):
    """Wraps a decoder layer; the model's forward reads plain attributes of its layers (use_sliding)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner" or "inner" not in self:
                raise
            return getattr(self["inner"], name)


def _updates(model, tokens):
    """(h_in, h_out) of every decoder layer on a real forward pass (independent of the engine's hooks)."""
    seen = []
    layers = model.layers
    originals = list(layers)

    class Tap(_Wrapper):
        def __call__(self, x, *args, **kwargs):
            out = self.inner(x, *args, **kwargs)
            seen.append((x, out))
            return out

    storage = model.model.layers
    try:
        for i, layer in enumerate(originals):
            storage[i] = Tap(layer)
        model(tokens)
    finally:
        for i, layer in enumerate(originals):
            storage[i] = layer
    return seen


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2", "llama"])
def test_post_norm_edit_removes_the_direction_from_every_update(model_type):
    model, config = _model(model_type)
    r = mx.random.normal((64,), key=mx.random.key(5))
    r = r / mx.linalg.norm(r)
    apply_plan(model, uniform_plan(r, 2))
    tokens = mx.array([[3, 17, 42, 99, 7, 250]])
    for h_in, h_out in _updates(model, tokens):
        delta = (h_out - h_in).reshape(-1, 64)
        ratio = mx.abs(delta @ r) / mx.linalg.norm(delta, axis=-1)
        assert float(ratio.max().item()) <= 1e-3


def test_targets_narrow_the_writers_and_a_name_that_writes_nothing_is_an_error():
    model, _ = _model("llama")
    writers = discover_writers(model, "llama")
    assert {w.path.rpartition(".")[2] for w in select_writers(writers, ["o_proj"]).values()} == {"o_proj"}
    with pytest.raises(UserError, match="q_proj: no residual writer"):
        select_writers(writers, ["q_proj"])  # a reader
    with pytest.raises(UserError, match="nonexistent"):
        select_writers(writers, ["nonexistent"])
    assert "self_attn.o_proj" in describe_writers(writers)


class _BiasWriter(_Wrapper):
    """A layer that adds a learned vector into the stream: no matrix can remove r from it."""

    def __init__(self, inner):
        super().__init__(inner)
        self.shift = mx.ones((64,))

    def __call__(self, x, *args, **kwargs):
        return self.inner(x, *args, **kwargs) + self.shift


def test_a_layer_whose_update_cannot_be_edited_is_refused_by_name():
    model, _ = _model("llama")
    model.model.layers[1] = _BiasWriter(model.model.layers[1])
    with pytest.raises(UserError, match="decoder layer 1 still writes"):
        discover_writers(model, "llama")


def _write_hf_gpt2(path, model, config):
    """An HF-layout GPT-2 folder: no 'model.' prefix and Conv1D weights stored (in, out), as sanitize() expects."""
    write_tiny_tokenizer(path)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        name = name.removeprefix("model.")
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.T
        weights[name] = value
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))


def test_hf_layout_gpt2_saved_model_equals_the_edited_model_in_memory(tmp_path):
    model, config = _model("gpt2")
    src = tmp_path / "gpt2-hf"
    src.mkdir()
    _write_hf_gpt2(src, model, config)
    (src / "consolidated.safetensors").write_bytes(b"original weights that must not ship")
    r = mx.random.normal((64,), key=mx.random.key(9))
    plan = uniform_plan(r / mx.linalg.norm(r), 2)
    edited, _, _ = load_model(src)
    apply_plan(edited, plan)
    save_ablated_model(src, tmp_path / "out", plan)
    saved, _ = mlx_lm.load(str(tmp_path / "out"))
    tokens = mx.array([[5, 9, 200, 31]])
    assert mx.allclose(saved(tokens), edited(tokens), atol=1e-4)
    assert not (tmp_path / "out" / "consolidated.safetensors").exists()
