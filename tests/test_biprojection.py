"""--direction-variant biprojected: each edited layer's direction loses its component along that layer's
harmless mean (after jim-plus's biprojection), through probing, the plan, the save and the direction file."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm

from mlx_abliteration.edit.strength_schedule import kernel_plan, uniform_spec
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.probe.capture import WelfordStats
from mlx_abliteration.probe.directions import compute_directions, load_directions
from mlx_abliteration.runtime.mx_types import load_with_metadata

from .test_pipeline import _config, datasets  # noqa: F401  (the module's dataset fixture)


def _stats(seed: int, layers: int = 4, hidden: int = 32) -> WelfordStats:
    stats = WelfordStats.empty(layers, hidden)
    stats.update(mx.random.normal((8, layers, hidden), key=mx.random.key(seed)) + seed)
    return stats


def test_every_edited_layer_is_projected_off_its_own_harmless_mean():
    harmful, harmless = _stats(1), _stats(2)
    directions = compute_directions(harmful, harmless, [0, 1, 2, 3], 4, "biprojected")
    plan = kernel_plan(directions, uniform_spec(2, 4))
    for layer in range(4):
        mean = harmless.mean[layer] / mx.linalg.norm(harmless.mean[layer])
        row = plan.layer_directions[layer]
        assert abs(float((row * mean).sum())) < 1e-5
        assert abs(float(mx.linalg.norm(row)) - 1) < 1e-5
    plain = kernel_plan(compute_directions(harmful, harmless, [0, 1, 2, 3], 4, "projected"), uniform_spec(2, 4))
    assert all(mx.array_equal(plain.layer_directions[i], plain.layer_directions[2]) for i in range(4))
    assert not mx.allclose(plan.layer_directions[0], plan.layer_directions[3]).item()  # one per edited layer


def test_a_biprojected_run_saves_weights_orthogonal_to_each_layers_direction(tiny_model, datasets, tmp_path):  # noqa: F811
    model = tiny_model()
    out = tmp_path / "out"
    run_pipeline(_config(model, out, datasets, no_eval=True, use_layer="2", direction_variant="biprojected"))
    directions, layer = load_directions(out)
    assert directions.variant == "biprojected" and directions.harmless_means is not None
    tensors, _ = load_with_metadata(str(out / "refusal_direction.safetensors"))
    assert tensors["harmless_means"].shape == directions.directions.shape
    rows = directions.for_edited_layers(
        mx.broadcast_to(directions.direction(layer), (directions.num_model_layers, directions.directions.shape[-1]))
    )
    saved = {}
    for shard in out.glob("model*.safetensors"):
        saved.update(mx.load(str(shard)))
    source = {}
    for shard in model.glob("model*.safetensors"):
        source.update(mx.load(str(shard)))
    for t in range(directions.num_model_layers):
        name = f"model.layers.{t}.self_attn.o_proj.weight"
        before = float(mx.linalg.norm(rows[t] @ source[name].astype(mx.float32)))
        after = float(mx.linalg.norm(rows[t] @ saved[name].astype(mx.float32)))
        assert after < 0.02 * before, (t, before, after)
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log["parameters"]["direction_variant"] == "biprojected"
    loaded, tokenizer = mlx_lm.load(str(out))
    assert isinstance(mlx_lm.generate(loaded, tokenizer, prompt="hi", max_tokens=2), str)
