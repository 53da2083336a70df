"""Every text architecture mlx-lm runs: tiny model builds, loads, runs, traces."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tests.arch_zoo import (
    MULTI_STREAM,
    NOT_TRACEABLE,
    UNBUILDABLE,
    build_tiny_model,
    build_tiny_model_dir,
    decoder_layer_list,
    residual_trace,
    text_model_types,
)

TYPES = [t for t in text_model_types() if t not in UNBUILDABLE]
IDS = [1, 5, 7, 9, 11, 13, 17, 19]


@pytest.mark.parametrize("model_type", TYPES)
def test_tiny_model_loads_runs_and_traces(model_type, tmp_path):
    import mlx_lm

    path = build_tiny_model_dir(model_type, tmp_path / model_type)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model, tokenizer = mlx_lm.load(str(path))
    logits = model(mx.array([IDS]))
    mx.eval(logits)
    assert logits.shape[:2] == (1, len(IDS))
    assert bool(mx.isfinite(logits).all())
    assert float(logits.std()) > 1e-3  # random weights give non-trivial logits

    # What was saved is what was built (sanitize is idempotent on MLX layout).
    ref, _ = build_tiny_model(model_type)
    assert mx.allclose(ref(mx.array([IDS])), logits, atol=1e-4, rtol=1e-4).item()

    layers = decoder_layer_list(model)
    if model_type in NOT_TRACEABLE:
        with pytest.raises(RuntimeError, match="not called"):
            residual_trace(model, IDS)
        return
    embed, trace = residual_trace(model, IDS)
    assert len(trace) == len(layers) >= 2
    assert decoder_layer_list(model) == layers  # originals restored
    assert embed is trace[0][0]
    for i, (h_in, h_out) in enumerate(trace):
        assert h_in.shape == h_out.shape, (i, h_in.shape, h_out.shape)
        assert bool(mx.isfinite(h_out.astype(mx.float32)).all())
        if model_type not in MULTI_STREAM:
            assert h_in.ndim == 3 and h_in.shape[:2] == (1, len(IDS))
        if i + 1 < len(trace):  # nothing sits between consecutive layers
            assert mx.allclose(h_out, trace[i + 1][0]).item(), i
    # The trace does not change the model's output.
    assert mx.allclose(model(mx.array([IDS])), logits).item()


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gemma3_text", "nemotron_h", "gpt2"])
def test_quantized_tiny_model(model_type, tmp_path):
    import mlx_lm

    path = build_tiny_model_dir(model_type, tmp_path, quantize_bits=4)
    model, _ = mlx_lm.load(str(path))
    assert any(hasattr(m, "scales") for _, m in model.named_modules())
    logits = model(mx.array([IDS]))
    assert bool(mx.isfinite(logits).all())
    _, trace = residual_trace(model, IDS)
    assert len(trace) == len(decoder_layer_list(model))


def test_bfloat16_tiny_model(tmp_path):
    import mlx_lm

    path = build_tiny_model_dir("qwen3", tmp_path, dtype="bfloat16")
    model, _ = mlx_lm.load(str(path))
    assert model.parameters()["model"]["embed_tokens"]["weight"].dtype == mx.bfloat16
    assert bool(mx.isfinite(model(mx.array([IDS])).astype(mx.float32)).all())


def test_zoo_tables_name_real_model_types():
    types = set(text_model_types())
    assert len(types) > 100
    assert set(UNBUILDABLE) <= types
    assert all(isinstance(r, str) and r for r in UNBUILDABLE.values())
    assert set(NOT_TRACEABLE) <= types - set(UNBUILDABLE)
    assert MULTI_STREAM <= types - set(UNBUILDABLE)
    for helper in ("base", "cache", "rope_utils", "switch_layers", "activations"):
        assert helper not in types
