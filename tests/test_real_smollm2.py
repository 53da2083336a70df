"""The whole pipeline on a real 4-bit model (SmolLM2-135M-Instruct from its PyPI wheel)."""

import json

import mlx.core as mx
import mlx_lm
import pytest

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.io.model_io import read_config
from mlx_abliteration.pipeline.flow import run_pipeline

pytestmark = pytest.mark.slow


def test_pipeline_on_smollm2_keeps_quantization_and_loads(smollm2_dir, tmp_path):
    out = tmp_path / "smol-abliterated"
    # a fixed layer keeps this CI test fast; auto selection is tested on tiny models
    config = AbliterationConfig(
        model=str(smollm2_dir), output_dir=str(out), max_prompts=16, eval_size=6, eval_max_tokens=8, use_layer="0.5"
    )
    result = run_pipeline(config)
    assert result.chosen_layer == round(0.5 * (read_config(smollm2_dir)["num_hidden_layers"] - 1))
    assert result.after["kl"] is not None and result.after["kl"] >= 0
    src = dict(mx.load(str(smollm2_dir / "model.safetensors")))
    new = dict(mx.load(str(out / "model.safetensors")))
    assert src.keys() == new.keys()
    for name, value in src.items():
        assert new[name].dtype == value.dtype and new[name].shape == value.shape, name
    # writers changed, readers did not; the 8-bit embedding stays 8-bit
    assert not mx.array_equal(
        src["model.layers.10.self_attn.o_proj.weight"], new["model.layers.10.self_attn.o_proj.weight"]
    )
    assert mx.array_equal(
        src["model.layers.10.self_attn.q_proj.weight"], new["model.layers.10.self_attn.q_proj.weight"]
    )
    assert read_config(out)["quantization"] == read_config(smollm2_dir)["quantization"]
    log = json.loads((out / "abliteration_log.json").read_text())
    assert 0.0 < log["edits"]["mean_residual_quantized"] < 0.5
    model, tok = mlx_lm.load(str(out))
    # MLX's CPU quantized matmul runs ~4 s per token for this model, so the
    # load-back check uses a 2-token prompt and 2 new tokens (the pipeline's own
    # evaluation above already generated with the edited weights, dequantized).
    # SmolLM2 does not refuse, so its "refusal direction" from 16+16 prompts is
    # noise-level: this checks the mechanics (load-back, generation), not quality.
    prompt_tokens = tok.encode("Hello")[:2]
    answer = mlx_lm.generate(model, tok, prompt=prompt_tokens, max_tokens=2)
    assert isinstance(answer, str)
    logits = model(mx.array([prompt_tokens]))
    assert bool(mx.all(mx.isfinite(logits)).item())
