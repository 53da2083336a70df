"""The vectorizable SwiGLU: as exact as MLX's (closer to float64), swapped into mlx-lm's model modules and back."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_swiglu

from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.runtime import cpu_activations
from mlx_abliteration.runtime.cpu_activations import fast_swiglu, fast_swiglu_wanted, use_fast_swiglu


def _float64_silu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def test_fast_swiglu_is_at_least_as_close_to_float64_as_mlx():
    x = np.linspace(-90, 90, 400_001, dtype=np.float32)
    truth = _float64_silu(x)
    ones = mx.ones(x.shape)
    ours = np.array(fast_swiglu(mx.array(x), ones)).astype(np.float64)
    theirs = np.array(mlx_swiglu(mx.array(x), ones)).astype(np.float64)
    assert np.abs(ours - truth).max() <= max(np.abs(theirs - truth).max(), 2e-6)
    normal = np.abs(x) < 20
    relative = np.abs(ours - truth)[normal] / np.maximum(np.abs(truth[normal]), 1e-30)
    assert relative.max() < 5e-7


def test_fast_swiglu_multiplies_by_x_and_handles_extremes():
    gate = mx.array([-1e30, -100.0, -1.0, 0.0, 1.0, 100.0, 1e30, float("inf"), float("nan")])
    x = mx.full(gate.shape, 3.0)
    out = np.array(fast_swiglu(gate, x))
    expected = 3.0 * _float64_silu(np.array(gate))
    finite = np.isfinite(expected)
    assert np.allclose(out[finite], expected[finite], rtol=1e-6, atol=1e-30)
    assert out[-2] == np.inf and np.isnan(out[-1])


def test_gradient_matches_mlx_swiglu():
    gate = mx.random.normal((3, 17), key=mx.random.key(3)) * 4
    x = mx.random.normal((3, 17), key=mx.random.key(4))

    def loss(f):
        return lambda g, u: (f(g, u) * mx.arange(17)).sum()

    ours = mx.grad(loss(fast_swiglu), argnums=(0, 1))(gate, x)
    theirs = mx.grad(loss(mlx_swiglu), argnums=(0, 1))(gate, x)
    for a, b in zip(ours, theirs):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_inputs_come_back_in_their_dtype(dtype):
    gate = mx.random.normal((4, 33), key=mx.random.key(0)).astype(dtype)
    x = mx.random.normal((4, 33), key=mx.random.key(1)).astype(dtype)
    out = fast_swiglu(gate, x)
    assert out.dtype == dtype
    assert mx.allclose(out.astype(mx.float32), mlx_swiglu(gate, x).astype(mx.float32), rtol=1e-2, atol=1e-2).item()


def test_loaded_model_runs_it_and_matches_mlx_swiglu(tiny_model):
    model, _, _ = load_model(tiny_model())
    module = importlib.import_module(type(model).__module__)
    if not fast_swiglu_wanted():
        pytest.skip("only MLX's CPU backend on x86-64 swaps the activation")
    assert module.swiglu is fast_swiglu
    ids = mx.array([[1, 5, 7, 9, 11, 13]])
    fast = model(ids)
    try:
        assert module.__name__ in use_fast_swiglu(False)
        assert module.swiglu is mlx_swiglu
        reference = model(ids)
    finally:
        use_fast_swiglu()
    assert mx.allclose(fast, reference, rtol=1e-5, atol=1e-5).item()


def test_env_switch_and_platform_gate(monkeypatch):
    monkeypatch.setenv(cpu_activations.FAST_SWIGLU_ENV, "0")
    assert not fast_swiglu_wanted()
    monkeypatch.delenv(cpu_activations.FAST_SWIGLU_ENV)
    monkeypatch.setattr(cpu_activations.platform, "machine", lambda: "arm64")
    assert not fast_swiglu_wanted()
    monkeypatch.setattr(cpu_activations.platform, "machine", lambda: "x86_64")
    assert fast_swiglu_wanted() == (mx.default_device() == mx.cpu)
