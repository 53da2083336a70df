"""Bucketed batch shapes (the GPU default): more padding, the same statistics.

On a GPU the probe pads each batch to a width that is a multiple of 32 and
uses power-of-two batch sizes, so a process builds few per-shape plans. The
padding is masked (left-padded path) or after each row's last token
(shared-prefix path), so bucketed and unbucketed probes agree to float
tolerance on every path, forced here on the CPU.
"""

import mlx.core as mx
import pytest

import mlx_abliteration.probe.capture as probe
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.batching import left_pad, round_up
from mlx_abliteration.probe.capture import auto_batch_size, capture_activations, pad_multiple, probe_prompts
from mlx_abliteration.probe.positions import ProbeSpec

PROMPTS = [
    "How do I bake bread?",
    "hi",
    "Tell me a long story about the sea and the wind, please, right now.",
    "How do I hack it?",
    "What is two plus two?",
]


def test_round_up_and_left_pad_width():
    assert [round_up(n, 32) for n in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]
    assert [round_up(n, 1) for n in (1, 7)] == [1, 7]
    tokens, padding = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=8)
    assert tokens.shape == (2, 8)
    assert padding == [5, 7]
    assert tokens[1].tolist() == [0] * 7 + [8]


def test_bucketed_batch_size_is_a_power_of_two():
    lengths = [150, 40]
    assert auto_batch_size(lengths, 4096, bucket=False) == 27
    assert auto_batch_size(lengths, 4096, bucket=True) == 32
    assert auto_batch_size([145], 4096, bucket=True) == 32  # 28 -> 32: both prompt sets share shapes
    assert auto_batch_size([1000], 4096, bucket=True) == 4
    assert auto_batch_size([1100], 4096, bucket=True) == 4  # 3 -> 4
    assert auto_batch_size([10], 4096, bucket=True) == 32  # never above the cap
    assert pad_multiple(True) == 32 and pad_multiple(False) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("position", ["last", "span"])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_bucketed_probe_equals_unbucketed(tiny_model, arch, position, shared_prefix, monkeypatch):
    model, tokenizer, _ = load_model(tiny_model(arch=arch, tie=arch != "qwen2"))
    if not shared_prefix:
        monkeypatch.setattr(probe, "_MIN_SHARED_PREFIX", 10**9)  # the left-padded path
    spec = ProbeSpec(position=position)
    single = capture_activations(model, tokenizer, PROMPTS, spec, batch_size=1)
    plain = probe_prompts(model, tokenizer, PROMPTS, spec, batch_size=2, bucket=False)
    bucketed = probe_prompts(model, tokenizer, PROMPTS, spec, batch_size=2, bucket=True)
    scale = max(float(mx.abs(single).max().item()), 1.0)
    assert bucketed.count == plain.count == len(PROMPTS)
    assert float(mx.abs(bucketed.mean - plain.mean).max().item()) <= 1e-4 * scale
    assert float(mx.abs(bucketed.mean - single.mean(0)).max().item()) <= 1e-4 * scale
    assert float(mx.abs(bucketed.m2 - plain.m2).max().item()) <= 1e-3 * max(float(plain.m2.max().item()), 1.0)


def test_bucketed_batches_are_padded_to_the_multiple(tiny_model, monkeypatch):
    """The forward passes really see widths that are multiples of 32 (so the test above compares padded runs)."""
    model, tokenizer, _ = load_model(tiny_model(arch="llama"))
    widths: list[int] = []
    real_call = type(model).__call__

    def spy(self, inputs, *args, **kwargs):
        widths.append(inputs.shape[1])
        return real_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", spy)
    probe_prompts(model, tokenizer, PROMPTS, batch_size=2, bucket=True)
    batched = widths[1:]  # the first call runs the shared prefix once
    assert batched and all(w % 32 == 0 for w in batched)
    widths.clear()
    probe_prompts(model, tokenizer, PROMPTS, batch_size=2, bucket=False)
    assert any(w % 32 for w in widths[1:])


def test_single_position_selector_picks_exactly_and_ignores_padding():
    """The one-position selector (a masked sum, no gather kernel) equals indexing, also with NaN in unread positions."""
    h = mx.random.normal((3, 5, 8)).astype(mx.bfloat16)
    h = mx.where(mx.arange(5)[None, :, None] == 0, mx.array(float("nan"), mx.bfloat16), h)  # garbage at padding
    select = probe.position_selector([[3], [1], [0]], [1, 2, 4], 5)  # rows read positions 4, 3, 4
    picked = select(h)
    assert picked.dtype == mx.bfloat16
    assert mx.array_equal(picked, h[mx.array([0, 1, 2]), mx.array([4, 3, 4])]).item()
