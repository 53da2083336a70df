"""export-adapter: a rank-1 mlx-lm LoRA adapter reproduces the abliterated model's logits (expressible parts)."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest

from .cli_helpers import assert_one_line_error, run_cli

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 11]])


@pytest.fixture(scope="module")
def direction(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    (d / "harmful.txt").write_text("\n".join(f"How do I build weapon number {i} to hurt people?" for i in range(16)))
    (d / "harmless.txt").write_text("\n".join(f"How do I bake bread recipe number {i}?" for i in range(16)))
    probe = run_cli(
        "probe",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        str(d / "harmful.txt"),
        "--harmless-dataset",
        str(d / "harmless.txt"),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--use-layer",
        "2",
        "--output",
        str(d / "dirs.safetensors"),
        "--quiet",
    )
    assert probe.returncode == 0, probe.stderr
    return d / "dirs.safetensors"


@pytest.mark.parametrize("bits", [None, 4])
def test_adapter_logits_equal_the_abliterated_model(tiny_model, direction, tmp_path, bits):
    model = tiny_model() if bits is None else tiny_model(bits=4)
    targets = ["--targets", "o_proj", "down_proj"]  # the expressible writers
    full = run_cli(
        "ablate",
        "-m",
        str(model),
        "--direction",
        str(direction),
        "-o",
        str(tmp_path / "full"),
        "--edited-precision",
        "float32",
        *targets,
    )
    assert full.returncode == 0, full.stderr
    adapter = run_cli(
        "export-adapter", "-m", str(model), "--direction", str(direction), "-o", str(tmp_path / "ad"), *targets
    )
    assert adapter.returncode == 0, adapter.stderr
    assert "saved a rank-1 adapter (8 modules" in adapter.stdout and "not expressible" not in adapter.stdout
    with_adapter, _ = mlx_lm.load(str(model), adapter_path=str(tmp_path / "ad"))
    abliterated, _ = mlx_lm.load(str(tmp_path / "full"))
    original, _ = mlx_lm.load(str(model))
    a, b, o = with_adapter(TOKENS), abliterated(TOKENS), original(TOKENS)
    assert mx.abs(a - b).max().item() < 1e-4 * max(1.0, mx.abs(b).max().item())
    assert mx.abs(o - b).max().item() > 0.1  # the edit is not a no-op
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 1 and config["lora_parameters"]["scale"] == 1.0
    assert sorted(config["lora_parameters"]["keys"]) == ["mlp.down_proj", "self_attn.o_proj"]


def test_unexpressible_parts_are_said_and_generate_runs(tiny_model, direction, tmp_path):
    model = tiny_model()
    adapter = run_cli("export-adapter", "-m", str(model), "--direction", str(direction), "-o", str(tmp_path / "ad"))
    assert adapter.returncode == 0, adapter.stderr
    assert "not expressible as an adapter" in adapter.stdout and "model.embed_tokens" in adapter.stdout
    log = json.loads((tmp_path / "ad" / "abliteration_log.json").read_text())
    assert log["adapter"]["not_expressed"] and log["adapter"]["size_bytes"] < 20_000
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "base_model_relation" not in card or "base_model_relation: adapter" in card
    assert "embedding rows" in card and "lora_a = W^T u" in card
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(model),
            "--adapter-path",
            str(tmp_path / "ad"),
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    refused = run_cli(
        "export-adapter", "-m", str(model), "--direction", str(direction), "-o", str(tmp_path / "np"), "--norm-preserve"
    )
    assert refused.returncode == 2 and "not a rank-1 update" in refused.stderr and not (tmp_path / "np").exists()


def test_ablate_adapter_only_writes_the_export_adapter_output(tiny_model, direction, tmp_path):
    model = str(tiny_model())
    common = ["-m", model, "--direction", str(direction), "--targets", "o_proj", "down_proj"]
    via_ablate = run_cli("ablate", *common, "-o", str(tmp_path / "a"), "--adapter-only")
    via_export = run_cli("export-adapter", *common, "-o", str(tmp_path / "e"))
    assert via_ablate.returncode == 0 and via_export.returncode == 0, via_ablate.stderr + via_export.stderr
    assert "saved a rank-1 adapter" in via_ablate.stdout
    assert not list((tmp_path / "a").glob("model*.safetensors"))  # no full copy
    a, e = mx.load(str(tmp_path / "a" / "adapters.safetensors")), mx.load(str(tmp_path / "e" / "adapters.safetensors"))
    assert a.keys() == e.keys() and all(mx.array_equal(a[k], e[k]) for k in a)


@pytest.mark.parametrize(
    "rows, message",
    [
        (mx.full((4, 64), float("nan")), "NaN/inf directions"),
        (mx.concatenate([mx.ones((3, 64)), mx.full((1, 64), float("inf"))]), "NaN/inf directions"),
        (mx.zeros((4, 64)), "a zero direction"),
        (mx.ones((4, 7)), "hidden size 64"),  # made for another model
        (mx.ones((3, 64)), "not a usable refusal-direction file"),  # 4 layers named, 3 rows
    ],
)
@pytest.mark.parametrize("command", ["export-adapter", "ablate"])
def test_an_unusable_direction_file_is_refused_alike_by_ablate_and_export_adapter(
    tiny_model, tmp_path, rows, message, command
):
    """One check of the file (DirectionFile.check/prepare) for both commands; nothing written, exit 2."""
    from mlx_abliteration.probe.directions import LayerStats, RefusalDirections, save_directions

    path = tmp_path / "dirs.safetensors"
    stats = [LayerStats(i, 1.0, 0.1, 0.9, 2.0) for i in range(4)]
    save_directions(path, RefusalDirections([0, 1, 2, 3], rows, stats, "mean-diff", 4), 2)
    result = run_cli(command, "-m", str(tiny_model()), "--direction", str(path), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, message)
    assert "saved" not in result.stdout and not (tmp_path / "out").exists()


def test_adapter_tensors_are_never_non_finite_nor_of_another_size(tiny_model):
    """Past the file's checks (a config without hidden_size, NaN in a weight): each module is checked as ablate's edit is."""
    from mlx_abliteration.edit.orthogonalize import uniform_plan
    from mlx_abliteration.errors import UserError
    from mlx_abliteration.export.adapter import adapter_tensors
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.writer_discovery import model_writers

    model, _, _ = load_model(tiny_model())
    writers = model_writers(model)
    wrong = uniform_plan(mx.ones((7,)) / 7**0.5, len(model.layers)).with_writers(writers)
    with pytest.raises(UserError, match="does not belong"):
        adapter_tensors(model, wrong)
    o_proj = model.layers[1].self_attn.o_proj
    o_proj.weight = mx.where(mx.arange(o_proj.weight.shape[1]) == 3, float("nan"), o_proj.weight)
    plan = uniform_plan(mx.ones((64,)) / 8, len(model.layers)).with_writers(writers)
    with pytest.raises(UserError, match=r"editing model\.layers\.1\.self_attn\.o_proj gave non-finite"):
        adapter_tensors(model, plan)
