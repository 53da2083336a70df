"""Bad input: one-line error naming problem and fix, non-zero exit, nothing written."""

import json
import os
import shutil

import pytest

from .cli_helpers import run_cli

GOOD = [f"prompt number {i} about something" for i in range(30)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    (d / "harmful.txt").write_text("\n".join("harmful " + p for p in GOOD))
    (d / "harmless.txt").write_text("\n".join("harmless " + p for p in GOOD))
    (d / "malformed.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "ok2"}\n{"prompt": broken\n')
    (d / "empty.txt").write_text("")
    (d / "nofield.jsonl").write_text('{"question": "a"}\n{"question": "b"}\n')
    return d


def _run(model, out, data, *extra, harmful="harmful.txt", harmless="harmless.txt", fault=None):
    return run_cli(*_args(model, out, data, *extra, harmful=harmful, harmless=harmless), fault=fault)


def _args(model, out, data, *extra, harmful="harmful.txt", harmless="harmless.txt"):
    args = [
        "run",
        "-m",
        str(model),
        "--harmful-dataset",
        str(data / harmful),
        "--harmless-dataset",
        str(data / harmless),
        "--max-prompts",
        "8",
        "--eval-size",
        "2",
        "--eval-max-tokens",
        "2",
        "--use-layer",
        "1",
    ]
    if out is not None:
        args += ["-o", str(out)]
    return [*args, *extra]


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in err[-1], err[-1]


def _leftovers(directory):
    return [p for p in os.listdir(directory) if p.startswith(".")]


def test_missing_model_path(tmp_path, data):
    _assert_user_error(_run(tmp_path / "nope", tmp_path / "out", data), "no such local path")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id(tmp_path, data):
    _assert_user_error(_run("someone/not-a-real-model", tmp_path / "out", data), "someone/not-a-real-model")
    assert not (tmp_path / "out").exists()


def test_dir_without_config_or_weights(tiny_model, tmp_path, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_run(empty, tmp_path / "out", data), "config.json")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model(), partial)
    os.remove(partial / "model.safetensors")
    _assert_user_error(_run(partial, tmp_path / "out", data), "safetensors")


def test_truncated_safetensors(tiny_model, tmp_path, data):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model(), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_user_error(_run(broken, tmp_path / "out", data), "truncated")
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_names_the_line(tiny_model, tmp_path, data):
    _assert_user_error(_run(tiny_model(), tmp_path / "out", data, harmful="malformed.jsonl"), "line 3")


@pytest.mark.parametrize("name", ["empty.txt", "nofield.jsonl"])
def test_empty_or_fieldless_dataset(tiny_model, tmp_path, data, name):
    _assert_user_error(_run(tiny_model(), tmp_path / "out", data, harmless=name))
    assert not (tmp_path / "out").exists()


def test_fewer_prompts_than_requested(tiny_model, tmp_path, data):
    proc = _run(tiny_model(), tmp_path / "out", data, "--max-prompts", "500")
    _assert_user_error(proc, "500")


@pytest.mark.parametrize(
    "flags",
    [["--use-layer", "99"], ["--layers", "2-40"], ["--layers", "0-1", "--use-layer", "3"], ["--use-layer", "abc"]],
)
def test_layer_out_of_range_or_not_probed(tiny_model, tmp_path, data, flags):
    _assert_user_error(_run(tiny_model(), tmp_path / "out", data, *flags, "--dry-run"), "layer")


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_strength(tiny_model, tmp_path, data, value):
    _assert_user_error(_run(tiny_model(), tmp_path / "out", data, "--ablation-strength", value), "strength")
    assert not (tmp_path / "out").exists()


def test_strength_not_a_number_is_an_argparse_error(tiny_model, tmp_path, data):
    proc = _run(tiny_model(), tmp_path / "out", data, "--ablation-strength", "abc")
    assert proc.returncode == 2 and "not a number" in proc.stderr and "Traceback" not in proc.stderr


def test_output_dir_equal_to_inside_or_busy(tiny_model, tmp_path, data):
    model = tiny_model()
    before = sorted(os.listdir(model))
    _assert_user_error(_run(model, model, data), "is the source")
    _assert_user_error(_run(model, model / "sub", data), "inside the source")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _assert_user_error(_run(model, busy, data), "--overwrite")
    assert os.listdir(busy) == ["keep.txt"]
    assert sorted(os.listdir(model)) == before


def test_unwritable_output_dir(tiny_model, tmp_path, data):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _assert_user_error(_run(tiny_model(), blocker / "out", data), "file")


@pytest.mark.parametrize("fault, code", [("disk-full", 2), ("interrupt", 130)])
def test_failure_during_save_leaves_no_output(tiny_model, tmp_path, data, fault, code):
    model = tiny_model(num_shards=3)
    before = {p: (model / p).read_bytes() for p in os.listdir(model)}
    out = tmp_path / "out"
    proc = _run(model, out, data, "--no-eval", fault=fault)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []
    assert {p: (model / p).read_bytes() for p in os.listdir(model)} == before


def test_internal_error_during_save_is_not_called_a_disk_problem(tiny_model, tmp_path, data):
    model = tiny_model(num_shards=3)
    out = tmp_path / "out"
    proc = _run(model, out, data, "--no-eval", fault="bug")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == "error: RuntimeError: bug"
    assert "raised at" in lines[-1] and "--debug" in lines[-1] and "Traceback" not in proc.stderr
    assert "disk" not in proc.stderr and "permission" not in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []

    log = tmp_path / "log.jsonl"
    proc = run_cli(
        *_args(model, out, data, "--no-eval", "--log-file", str(log)),
        fault="bug",
        env={"MLX_ABLITERATION_LOG_FILE": ""},
    )
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "ERROR" and "RuntimeError: bug" in entry["exception"] and "Traceback" in entry["exception"]
    assert str(log) in proc.stderr

    proc = run_cli("--debug", *_args(model, out, data, "--no-eval"), fault="bug")
    assert (
        proc.returncode == 1
        and "Traceback (most recent call last)" in proc.stderr
        and "RuntimeError: bug" in proc.stderr
    )


def test_debug_shows_what_is_behind_a_user_error(tiny_model, tmp_path, data):
    model = tiny_model(num_shards=3)
    proc = run_cli(*_args(model, tmp_path / "out", data, "--no-eval", "--debug"), fault="disk-full")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "OSError: [Errno 28]" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write")


def test_bad_config_file(tiny_model, tmp_path, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("not_a_setting: 3\n")
    _assert_user_error(_run(tiny_model(), tmp_path / "out", data, "--config", str(cfg)), "not_a_setting")
