"""Shared fixtures: tiny random models built in the test run, real models cached."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_abliteration  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_abliteration.runtime.utils import cache_root

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = cache_root()  # the user's cache, read before private_cache points the variable elsewhere


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Baselines, studies and GGUF conversions made by tests go to a temporary cache, not the user's.

    The real models are still read from (and converted once into) ``CACHE_DIR``.
    """
    patch = pytest.MonkeyPatch()
    patch.setenv("MLX_ABLITERATION_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(**kwargs)`` -> path of a random model dir (built once per kwargs).

    kwargs go to ``tests.support.tiny_models.build_tiny_model``: arch
    (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, phi3, gemma2, gemma3_text, gpt2), tie, dtype, bits, group_size, num_shards,
    num_layers, hidden_size, seed, embedding_bits.
    """
    from tests.support.tiny_models import build_tiny_model

    built: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            name = "_".join(f"{k}-{v}" for k, v in key) or "default"
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{name}"), **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (4-bit) converted from its PyPI wheel, cached."""
    from tests.support.real_models import ensure_model

    return ensure_model("smollm2", CACHE_DIR)


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct converted from its PyPI chunk wheels, cached."""
    from tests.support.real_models import ensure_model

    return ensure_model("qwen", CACHE_DIR)
