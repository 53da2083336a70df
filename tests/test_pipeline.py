"""The full pipeline on tiny models, through the library and the CLI."""

import json
import os
import subprocess
import sys

import mlx_lm
import pytest

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.pipeline.events import Event
from mlx_abliteration.pipeline.flow import iter_events, output_weights_path, run_pipeline

from .cli_helpers import run_cli

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(24)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(24)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in HARMLESS))
    return d / "harmful.txt", d / "harmless.jsonl"


def _config(model, out, datasets, **kw):
    base = dict(
        model=str(model),
        output_dir=str(out),
        harmful_dataset=str(datasets[0]),
        harmless_dataset=str(datasets[1]),
        max_prompts=12,
        eval_size=4,
        eval_max_tokens=4,
    )
    return AbliterationConfig(**{**base, **kw})


def test_run_pipeline_end_to_end(tiny_model, tmp_path, datasets):
    events: list[Event] = []
    out = tmp_path / "out"
    result = run_pipeline(_config(tiny_model(num_shards=2), out, datasets), events.append)
    kinds = {e.kind for e in events}
    assert {"stage", "progress", "layers", "eval", "done"} <= kinds
    assert result.output_dir == str(out)
    assert result.after["kl"] >= 0 and result.before["harmful_total"] == 4
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log["chosen_layer"] == result.chosen_layer
    assert log["metrics"]["after"]["kl"] == pytest.approx(result.after["kl"])
    assert len(log["layer_stats"]) == 4 and log["versions"]["mlx"]
    assert output_weights_path(out).name == "model.safetensors.index.json"
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and "abliterated" in card
    assert "base_model:" not in card  # a local folder has no hub id to name (the Hub would reject a path)
    answers = [json.loads(line) for line in (out / "evaluation_responses.jsonl").read_text().splitlines()]
    answers = [a for a in answers if a["kind"] != "capability"]  # the capability questions (tests/test_capability.py)
    assert {a["model"] for a in answers} == {"before", "after"} and len(answers) == 16
    assert {"prompt", "response", "refusal", "kind"} <= set(answers[0])
    model, tok = mlx_lm.load(str(out))
    assert isinstance(mlx_lm.generate(model, tok, prompt="hi", max_tokens=3), str)


def test_fixed_layer_dry_run_writes_nothing(tiny_model, tmp_path, datasets):
    out = tmp_path / "out"
    result = run_pipeline(_config(tiny_model(), out, datasets, dry_run=True, use_layer="-2", no_eval=True))
    assert result.chosen_layer == 2 and result.output_dir is None
    assert not out.exists()


def test_iter_events_streams_and_ends_with_result(tiny_model, tmp_path, datasets):
    events = list(iter_events(_config(tiny_model(), tmp_path / "o", datasets, no_eval=True)))
    assert events[-1].kind == "result"
    assert any(e.kind == "progress" for e in events)


def test_iter_events_reports_user_errors(tmp_path, datasets):
    events = list(iter_events(_config(tmp_path / "missing", tmp_path / "o", datasets)))
    assert events[-1].kind == "error" and "no such local path" in events[-1].message


def test_cli_run_probe_ablate_roundtrip(tiny_model, tmp_path, datasets):
    model = tiny_model(bits=4)
    common = [
        "-m",
        str(model),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--max-prompts",
        "8",
    ]
    run = run_cli(
        "run", *common, "-o", str(tmp_path / "run"), "--eval-size", "4", "--eval-max-tokens", "4", "--use-layer", "2"
    )
    assert run.returncode == 0, run.stderr
    assert "saved abliterated model" in run.stdout and "refusals, harmful" in run.stdout
    probe = run_cli(
        "probe", *common, "--eval-size", "4", "--use-layer", "2", "--output", str(tmp_path / "dir.safetensors")
    )
    assert probe.returncode == 0, probe.stderr
    ablate = run_cli(
        "ablate", "-m", str(model), "--direction", str(tmp_path / "dir.safetensors"), "-o", str(tmp_path / "abl")
    )
    assert ablate.returncode == 0, ablate.stderr
    # Same direction, same layer, same plan: the same weights as the full run.
    for name in ("model.safetensors",):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "abl" / name).read_bytes()


def test_cli_json_mode_and_config_file(tiny_model, tmp_path, datasets):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"harmful-dataset: {datasets[0]}\nharmless_dataset: {datasets[1]}\nmax_prompts: 6\neval_size: 4\nuse_layer: 1\nno_eval: true\n"
    )
    proc = run_cli("run", "-m", str(tiny_model()), "--config", str(cfg), "--use-layer", "3", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1]["event"] == "result" and lines[-1]["chosen_layer"] == 3  # the flag beats the file
    toml = tmp_path / "cfg.toml"
    toml.write_text(
        f'harmful_dataset = "{datasets[0]}"\nharmless_dataset = "{datasets[1]}"\nmax_prompts = 6\neval_size = 4\nuse_layer = "1"\nno_eval = true\n'
    )
    proc = run_cli("run", "-m", str(tiny_model()), "--config", str(toml), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["chosen_layer"] == 1


def test_seed_cli_shim(tiny_model, tmp_path, datasets):
    import subprocess
    import sys

    from .cli_helpers import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "-m",
            str(tiny_model()),
            "-o",
            str(tmp_path / "o"),
            "--harmful-dataset",
            str(datasets[0]),
            "--harmless-dataset",
            str(datasets[1]),
            "--max-prompts",
            "6",
            "--eval-size",
            "4",
            "--no-eval",
            "--use-layer",
            "1",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_each_phase_and_the_end_of_a_run_release_mlx_buffer_cache(tiny_model, tmp_path, datasets):
    # In a fresh process: threads left by other tests (a cancelled GUI run, say) free arrays at any time.
    code = """
import json, os, sys
import mlx_abliteration
import mlx.core as mx
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.pipeline.flow import iter_events, run_pipeline
base = json.loads(sys.argv[1])
cached_at_stage = []
def on_event(event):
    if event.kind in ("stage", "done"):
        cached_at_stage.append(mx.get_cache_memory())
run_pipeline(AbliterationConfig(**{**base, "output_dir": sys.argv[2]}), on_event)
events = list(iter_events(AbliterationConfig(**{**base, "output_dir": sys.argv[3]})))
print(json.dumps({"stages": cached_at_stage, "last": events[-1].kind, "after_stream": mx.get_cache_memory()}))
sys.stdout.flush()
# Measured; exit now: after a worker thread used MLX, MLX's teardown can abort the interpreter
# ("terminate called without an active exception"; seen with the code before this session too).
os._exit(0)
"""
    config = _config(tiny_model(), tmp_path / "unused", datasets).to_dict()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config), str(tmp_path / "out"), str(tmp_path / "out2")],
        capture_output=True,
        text=True,
        env={**os.environ, "MLX_ABLITERATION_LOG_FILE": os.devnull},
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["stages"] and all(size == 0 for size in seen["stages"]), seen
    # The GUI's stream (a long-lived process) also releases what the finished run's model left cached.
    # A few bytes can come back after the release (MLX frees a worker thread's state when the OS thread ends);
    # what matters is that the run's buffers (megabytes even for this tiny model) are not kept.
    assert seen["last"] == "result" and seen["after_stream"] < 1 << 16, seen


def test_the_loaded_model_is_released_before_the_save(tiny_model, tmp_path, datasets, monkeypatch):
    """The save reads the source files: the loaded (float32 on a CPU) model must not sit beside the shards."""
    import gc
    import weakref

    from mlx_abliteration.pipeline import steps

    loaded, alive_at_save = [], []
    real_load, real_save = steps.load, steps.save

    def load(*args, **kwargs):
        model, tokenizer, config = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer, config

    def save(*args, **kwargs):
        gc.collect()
        alive_at_save.append(loaded[0]() is not None)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(steps, "load", load)
    monkeypatch.setattr(steps, "save", save)
    run_pipeline(_config(tiny_model(), tmp_path / "out", datasets))
    assert alive_at_save == [False]


def test_a_run_parses_the_source_config_once(tiny_model, tmp_path, datasets, monkeypatch):
    from collections import Counter
    from functools import lru_cache

    from mlx_abliteration.io import model_checks

    parsed: Counter = Counter()
    assert hasattr(model_checks._parsed_config, "cache_info"), "config.json is parsed once per version of the file"
    original = model_checks._parsed_config.__wrapped__

    @lru_cache(maxsize=16)
    def counting(file_name: str, size: int, mtime_ns: int) -> dict:
        parsed[file_name] += 1
        return original(file_name, size, mtime_ns)

    monkeypatch.setattr(model_checks, "_parsed_config", counting)
    model = tiny_model()
    run_pipeline(_config(model, tmp_path / "out", datasets, use_layer="1"))
    source = str((model / "config.json").resolve())
    assert parsed[source] == 1, parsed


def test_ablate_layers_separated_edits_only_the_layers_that_separate(tiny_model, tmp_path, datasets):
    """``--ablate-layers separated:F``: the writers of the layers whose separation is at least F times the
    largest are edited; every other layer's weights are the source's, bit for bit."""
    import mlx.core as mx

    source = tiny_model(arch="llama")
    out = tmp_path / "out"
    run_pipeline(_config(source, out, datasets, ablate_layers="separated:0.9", use_layer="2", no_eval=True))
    stats = json.loads((out / "abliteration_log.json").read_text())["layer_stats"]
    top = max(s["separation"] for s in stats)
    expected = {s["layer"] for s in stats if s["separation"] >= 0.9 * top}
    assert 0 < len(expected) < len(stats)  # the share leaves some layers out on this model
    before, after = mx.load(str(source / "model.safetensors")), {}
    for shard in out.glob("*.safetensors"):
        after.update(mx.load(str(shard)))
    changed = {
        int(name.split(".")[2])
        for name, value in after.items()
        if name.startswith("model.layers.") and not mx.array_equal(value, before[name]).item()
    }
    assert changed == expected


@pytest.mark.parametrize("value", ["separated:0", "separated:1.5", "separated:x"])
def test_a_bad_separation_share_is_one_line_before_any_work(tiny_model, tmp_path, datasets, value):
    proc = run_cli("run", "-m", str(tiny_model(arch="llama")), "-o", str(tmp_path / "out"), "--ablate-layers", value)
    assert proc.returncode == 2 and "separated:F" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
