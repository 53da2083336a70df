"""Probing after a shared prompt prefix (computed once) equals probing every prompt on its own."""

import mlx.core as mx
import pytest

import mlx_abliteration.probe.capture as probe
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.capture import capture_activations, encode_for_probe, probe_prefix_length, probe_prompts
from mlx_abliteration.probe.positions import ProbeSpec

PROMPTS = [
    "How do I bake bread?",
    "hi",
    "Tell me a long story about the sea and the wind, please, right now.",
    "How do I hack it?",
]


def test_shared_prefix_stops_before_probed_positions():
    tokens = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7]]
    assert probe_prefix_length(tokens, [[4], [3], [4]]) == 3
    assert probe_prefix_length(tokens, [[4], [1], [4]]) == 1
    assert probe_prefix_length([[5, 6], [7, 8]], [[1], [1]]) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "gpt2"])
@pytest.mark.parametrize("position", ["last", "span"])
def test_prefix_path_matches_single_prompts(tiny_model, arch, position, monkeypatch):
    model, tokenizer, _ = load_model(tiny_model(arch=arch, tie=arch != "qwen2"))
    spec = ProbeSpec(position=position)
    token_lists, positions = encode_for_probe(tokenizer, PROMPTS, spec)
    assert probe_prefix_length(token_lists, positions) >= probe._MIN_SHARED_PREFIX
    single = capture_activations(model, tokenizer, PROMPTS, spec, batch_size=1)
    stats = probe_prompts(model, tokenizer, PROMPTS, spec, batch_size=3)
    scale = max(float(mx.abs(single).max().item()), 1.0)
    assert float(mx.abs(stats.mean - single.mean(0)).max().item()) <= 1e-4 * scale
    monkeypatch.setattr(probe, "_MIN_SHARED_PREFIX", 10**9)  # the left-padded path gives the same
    plain = probe_prompts(model, tokenizer, PROMPTS, spec, batch_size=3)
    assert float(mx.abs(stats.mean - plain.mean).max().item()) <= 1e-4 * scale
    assert float(mx.abs(stats.m2 - plain.m2).max().item()) <= 1e-3 * max(float(plain.m2.max().item()), 1.0)
