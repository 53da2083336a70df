"""run, run --plan-json, search --save, ablate and the GUI go through one pipeline function and write the same files;
--dry-run probes, prints the per-layer stats and nothing else."""

import ast
import json
from pathlib import Path

import pytest

from mlx_abliteration.cli.main import main
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.pipeline import flow as pipeline
from tests.support.patching import patch_everywhere

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(24)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(24)]
# What every saved model holds; evaluation_responses.jsonl too when evaluation ran.
RECORD_FILES = {"config.json", "abliteration_log.json", "refusal_direction.safetensors", "README.md"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.txt").write_text("\n".join(HARMLESS))
    return d / "harmful.txt", d / "harmless.txt"


@pytest.fixture
def calls(monkeypatch):
    """Every run_pipeline call: (plan source class name, result)."""
    monkeypatch.setenv("MLX_ABLITERATION_LOG_FILE", "/dev/null")
    seen = []
    real = pipeline.run_pipeline

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        source = kwargs.get("plan_source") or (args[3] if len(args) > 3 else None)
        seen.append((type(source).__name__ if source else "LayerChoice", result))
        return result

    patch_everywhere(monkeypatch, pipeline, "run_pipeline", spy)
    return seen


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def _check_saved(out: Path, result, evaluated: bool) -> None:
    names = _files(out)
    assert RECORD_FILES <= names, names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names
    assert any(n.startswith("tokenizer") for n in names)
    assert ("evaluation_responses.jsonl" in names) == evaluated
    # The record the caller gets is the log as written (weights digests included).
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log == json.loads(json.dumps(result.record, default=str))
    assert log["weights"]["output_sha256"] and log["edits"]["modules"] > 0
    assert (log["metrics"]["after"] is not None) == evaluated
    assert ("Not evaluated" in (out / "README.md").read_text()) != evaluated


def test_run_plan_json_search_ablate_and_gui_share_the_pipeline_and_its_outputs(tiny_model, datasets, tmp_path, calls):
    model = str(tiny_model(num_shards=2))
    common = [
        "-m",
        model,
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--eval-max-tokens",
        "4",
        "--quiet",
    ]
    outs = {name: tmp_path / name for name in ("run", "plan", "search", "ablate", "gui")}

    assert main(["run", *common, "--use-layer", "2", "-o", str(outs["run"])]) == 0
    search = [
        "search",
        *common,
        "--n-trials",
        "2",
        "--n-startup-trials",
        "1",
        "--search-prompts",
        "4",
        "--search-max-tokens",
        "2",
        "--max-kl",
        "1e9",
        "--study-dir",
        str(tmp_path / "studies"),
        "-o",
        str(outs["search"]),
    ]
    assert main(search) == 0
    assert (
        main(["run", *common, "--plan-json", str(outs["search"] / "abliteration_log.json"), "-o", str(outs["plan"])])
        == 0
    )
    direction = str(outs["run"] / "refusal_direction.safetensors")
    assert main(["ablate", "-m", model, "--direction", direction, "-o", str(outs["ablate"]), "--quiet"]) == 0

    pytest.importorskip("gradio")
    from mlx_abliteration.gui import run_abliteration_stream

    views = list(
        run_abliteration_stream(
            model,
            str(outs["gui"]),
            harmful_dataset=str(datasets[0]),
            harmless_dataset=str(datasets[1]),
            max_prompts=8,
            eval_size=4,
            eval_max_tokens=4,
            use_layer="2",
            output_root=tmp_path,
        )
    )
    assert views[-1].status.startswith("**Done.**"), views[-1].status

    sources = [name for name, _ in calls]
    assert sources == ["LayerChoice", "SearchTrial", "PlanFile", "DirectionFile", "LayerChoice"]
    results = dict(zip(["run", "search", "plan", "ablate", "gui"], [result for _, result in calls]))
    for name, out in outs.items():
        _check_saved(out, results[name], evaluated=name != "ablate")
    assert _files(outs["run"]) == _files(outs["plan"]) == _files(outs["search"]) == _files(outs["gui"])
    assert _files(outs["ablate"]) == _files(outs["run"]) - {"evaluation_responses.jsonl"}
    # Same direction, layer and strength: ablate and run write the same weights; so do the GUI and run.
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (
            (outs["ablate"] / shard).read_bytes()
            == (outs["run"] / shard).read_bytes()
            == (outs["gui"] / shard).read_bytes()
        )
        assert (outs["plan"] / shard).read_bytes() == (outs["search"] / shard).read_bytes()
    assert json.loads((outs["ablate"] / "abliteration_log.json").read_text())["command"] == "ablate"


def test_dry_run_probes_prints_stats_and_neither_evaluates_nor_writes(
    tiny_model, datasets, tmp_path, monkeypatch, capsys
):
    from mlx_abliteration.evaluation import evaluate

    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run must not evaluate")

    monkeypatch.setattr(evaluate, "evaluate_model", forbidden)
    monkeypatch.setattr(evaluate, "reference_logprobs", forbidden)
    monkeypatch.setenv("MLX_ABLITERATION_LOG_FILE", "/dev/null")
    events = []
    config = AbliterationConfig(
        model=str(tiny_model()),
        output_dir=str(tmp_path / "out"),
        harmful_dataset=str(datasets[0]),
        harmless_dataset=str(datasets[1]),
        max_prompts=8,
        eval_size=4,
        dry_run=True,
        use_layer="2",
    )
    result = pipeline.run_pipeline(config, events.append)
    assert result.output_dir is None and result.before is None and result.after is None and result.chosen_layer == 2
    assert not any(e.kind == "eval" for e in events) and any(e.kind == "layers" for e in events)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [
        "run",
        "-m",
        config.model,
        "-o",
        str(tmp_path / "out"),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--use-layer",
        "2",
        "--dry-run",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "separation" in out and "<= chosen" in out and "nothing written" in out
    assert "refusals" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no temp dir


def test_no_module_imports_a_private_name_from_another():
    package = Path(__file__).resolve().parent.parent / "mlx_abliteration"
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [*(node.module or "").split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names for part in a.name.split(".")]
            else:
                continue
            found += [
                f"{path.relative_to(package)}:{node.lineno} {n}"
                for n in names
                if n.startswith("_") and not n.startswith("__")
            ]
    assert not found
