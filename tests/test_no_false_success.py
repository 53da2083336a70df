"""Success is reported only for the model the user asked for: edits on every writer, finite weights."""

import json

import mlx.core as mx
import pytest

from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.errors import UserError
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.probe.directions import LayerStats, RefusalDirections, save_directions

from .cli_helpers import run_cli


@pytest.fixture(scope="module")
def direction_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("direction") / "refusal_direction.safetensors"
    r = mx.random.normal((4, 64), key=mx.random.key(1))
    stats = [LayerStats(i, 1.0, 0.1, 0.9, 2.0) for i in range(4)]
    save_directions(
        path, RefusalDirections([0, 1, 2, 3], r / mx.linalg.norm(r, axis=-1, keepdims=True), stats, "mean-diff", 4), 2
    )
    return path


def _ablate(model, direction, out, *flags):
    return run_cli("ablate", "-m", str(model), "--direction", str(direction), "-o", str(out), *flags)


def _one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "saved" not in result.stdout
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--targets", "nonexistent_module"], "nonexistent_module: no residual writer"),
        (["--targets", "q_proj"], "q_proj: no residual writer"),  # a reader, never edited
        (["--ablation-strength", "1e308"], "between 0 and"),
        (["--ablation-strength", "0"], "edits no module"),
    ],
)
def test_ablate_refuses_a_result_that_is_not_an_abliterated_model(tiny_model, direction_file, tmp_path, flags, message):
    src = tiny_model()
    out = tmp_path / "out"
    result = _ablate(src, direction_file, out, *flags)
    assert message in _one_line_error(result)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_targets_narrow_the_edit_through_the_cli(tiny_model, direction_file, tmp_path):
    result = _ablate(tiny_model(), direction_file, tmp_path / "out", "--targets", "o_proj")
    assert result.returncode == 0, result.stderr
    log = json.loads((tmp_path / "out" / "abliteration_log.json").read_text())
    assert log["edits"]["modules"] == 4 and set(log["edits"]["by_role"]) == {"attn"}


def test_non_finite_source_weights_are_never_saved(tiny_model, tmp_path):
    import shutil

    src = tmp_path / "nan-model"
    shutil.copytree(tiny_model(), src)
    weights = mx.load(str(src / "model.safetensors"))
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    weights[o_proj] = weights[o_proj].at[0, 0].add(float("inf"))
    mx.eval(weights)  # read everything before the file is rewritten
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    r = mx.ones((64,)) / 8
    with pytest.raises(UserError, match="non-finite|NaN|inf"):
        save_ablated_model(src, tmp_path / "out", uniform_plan(r, 4))
    assert not (tmp_path / "out").exists()
