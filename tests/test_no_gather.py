"""No gathers of our own on the paths a `run` takes before saving (issue 17: a machine's first run on CUDA).

MLX runs ``a[i]`` (a lone integer), ``a[array]`` and index tuples holding
arrays as Gather; its CUDA backend compiles every gather kernel with NVRTC at
first use (~3 s each on an H200, again on every machine without MLX's kernel
cache). Index tuples of integers and slices are Slice (views). The model's own
embedding lookup is mlx-lm's business and not counted: only indexing done
from our modules is. Runs on any device.
"""

import sys

import mlx.core as mx
import pytest

from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.evaluation.generation import first_token_logprobs
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.capture import probe_prompts
from mlx_abliteration.probe.prefix_batch import shared_first_token_logprobs, shared_prefill
from mlx_abliteration.probe.writer_discovery import discover_writers

OURS = ("core/writers.py", "core/prefix_batch.py", "core/probe.py")
PROMPTS = [f"How do I bake bread recipe number {i}" + " please" * (i % 5) for i in range(9)]


def _gathers(index) -> bool:
    if isinstance(index, (int, mx.array, list)) and not isinstance(index, bool):
        return True
    return isinstance(index, tuple) and any(isinstance(i, (mx.array, list)) for i in index)


@pytest.fixture
def gathers(monkeypatch):
    """Where our modules index an MLX array in a way MLX runs as a gather."""
    found: list[str] = []
    real = mx.array.__getitem__

    def spy(self, index):
        caller = sys._getframe(1).f_code
        if _gathers(index) and caller.co_filename.replace("\\", "/").endswith(OURS):
            found.append(f"{caller.co_filename}:{sys._getframe(1).f_lineno} {caller.co_name}")
        return real(self, index)

    monkeypatch.setattr(mx.array, "__getitem__", spy)
    return found


def test_what_counts_as_a_gather():
    assert _gathers(1) and _gathers(mx.array([1])) and _gathers((slice(None), mx.array([0]))) and _gathers([0, 1])
    assert not _gathers((1, slice(None))) and not _gathers(slice(0, 1)) and not _gathers((0, 2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_writer_discovery_indexes_without_gathers(tiny_model, arch, gathers):
    model, _, _ = load_model(tiny_model(arch=arch))
    assert discover_writers(model, arch)
    assert gathers == []


def test_probe_indexes_without_gathers(tiny_model, gathers):
    model, tokenizer, _ = load_model(tiny_model())
    stats = probe_prompts(model, tokenizer, PROMPTS, batch_size=4)  # shared-prefix path
    assert stats.count == len(PROMPTS)
    assert gathers == []


def test_shared_prefill_indexes_without_gathers_and_keeps_each_rows_logits(tiny_model, gathers):
    model, tokenizer, _ = load_model(tiny_model())
    ids = encode_chats(tokenizer, PROMPTS, None)
    shared = shared_first_token_logprobs(model, ids, 4)
    assert gathers == []
    assert mx.allclose(shared, first_token_logprobs(model, ids, 16), atol=1e-4)
    logits, _ = shared_prefill(model, ids[:5], with_cache=False)
    assert logits.shape[:2] == (5, 1)
    assert gathers == []


def test_float32_replays_run_uncompiled_and_compiling_comes_back(tiny_model, monkeypatch):
    """mlx-lm's compiled activations would be one more NVRTC kernel (their float32 variant) on CUDA."""
    import mlx_abliteration.probe.writers as writers

    calls: list[str] = []
    monkeypatch.setattr(writers.mx, "disable_compile", lambda: calls.append("off"))
    monkeypatch.setattr(writers.mx, "enable_compile", lambda: calls.append("on"))
    model, _, _ = load_model(tiny_model())
    discover_writers(model, "llama")
    layers = len(model.layers)
    assert calls == ["off", "on"] * layers  # once per decoder layer's float32 tests, always turned back on
    calls.clear()
    monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")  # the user's choice stays
    discover_writers(model, "llama")
    assert calls == []
