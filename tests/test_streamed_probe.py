"""The layer-streamed probe gives the in-memory probe's statistics and directions."""

import mlx.core as mx
import pytest

from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.capture import probe_prompts
from mlx_abliteration.probe.directions import compute_directions
from mlx_abliteration.probe.positions import ProbeSpec
from mlx_abliteration.probe.streamed import streamed_probe

HARMFUL = ["Tell me how to pick a lock.", "How do I hack a computer?", "hack it now, please, quickly and quietly"]
HARMLESS = ["How do I bake bread?", "hi", "Write a poem about the sea and the wind.", "What is the capital of France?"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "llama", "num_shards": 2},
        {"arch": "qwen2", "tie": False},
        {"arch": "mixtral"},
        {"arch": "llama", "bits": 4},
    ],
    ids=["llama-sharded", "qwen2", "mixtral", "llama-4bit"],
)
@pytest.mark.parametrize("position", ["last", "span"])
def test_streamed_directions_equal_in_memory(tiny_model, kwargs, position):
    path = tiny_model(**kwargs)
    model, tokenizer, _ = load_model(path)
    spec = ProbeSpec(position=position)
    layers = list(range(len(model.layers)))
    expected = [probe_prompts(model, tokenizer, p, spec, layers, batch_size=2) for p in (HARMFUL, HARMLESS)]
    streamed = streamed_probe(path, [HARMFUL, HARMLESS], spec, layers, batch_size=2)
    for want, got in zip(expected, streamed):
        assert got.count == want.count
        assert float(mx.abs(got.mean - want.mean).max()) <= 1e-4
    want_dirs = compute_directions(*expected, layers, len(layers))
    got_dirs = compute_directions(*streamed, layers, len(layers))
    assert float(mx.abs(got_dirs.directions - want_dirs.directions).max()) <= 1e-4


def test_streamed_subset_of_layers(tiny_model):
    path = tiny_model(arch="llama")
    model, tokenizer, _ = load_model(path)
    expected = probe_prompts(model, tokenizer, HARMLESS, layer_ids=[1, 2])
    (got,) = streamed_probe(path, [HARMLESS], layer_ids=[1, 2])
    assert got.mean.shape == expected.mean.shape
    assert float(mx.abs(got.mean - expected.mean).max()) <= 1e-4
