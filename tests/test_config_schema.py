"""--config values are checked by the flags' own types and choices (issue 13 item 2), through the CLI."""

from __future__ import annotations

import os

import pytest

from .cli_helpers import run_cli

PROMPTS = [f"prompt number {i} about something" for i in range(20)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "harmful.txt").write_text("\n".join("harmful " + p for p in PROMPTS))
    (d / "harmless.txt").write_text("\n".join("harmless " + p for p in PROMPTS))
    return d


def _run(model, out, data, config_text, *extra, suffix=".yaml"):
    config = out.parent / f"settings{suffix}"
    config.write_text(config_text)
    return run_cli(
        "run",
        "-m",
        str(model),
        "-o",
        str(out),
        "--harmful-dataset",
        str(data / "harmful.txt"),
        "--harmless-dataset",
        str(data / "harmless.txt"),
        "--max-prompts",
        "4",
        "--eval-size",
        "2",
        "--no-eval",
        "--use-layer",
        "1",
        "--config",
        str(config),
        *extra,
    )


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "saved" not in proc.stdout, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "text, needle",
    [
        ('overwrite: "false"\n', "argument --overwrite: expects true or false, got the string 'false'"),
        ('dry_run: "no"\n', "argument --dry-run: expects true or false"),
        ("targets: o_proj\n", "argument --targets: expects a list of names"),
        ("max-prompts: lots\n", "argument --max-prompts: invalid int value: 'lots'"),
        ("eval_size: 2.5\n", "argument --eval-size: invalid int value: 2.5"),
        ("ablation_strength: [1]\n", "argument --ablation-strength: expects a number"),
        ("seed: null\n", "argument --seed: needs a value"),
    ],
)
def test_wrongly_typed_config_values_are_one_line_errors(tiny_model, tmp_path, data, text, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the previous output")
    line = _error(_run(tiny_model(), out, data, text))
    assert line.startswith("error: config file ") and needle in line, line
    assert os.listdir(out) == ["previous.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_config_choice_error_matches_the_flag(tiny_model, tmp_path, data):
    from_config = _error(_run(tiny_model(), tmp_path / "out", data, "probe_position: middle\n"))
    from_flag = run_cli("run", "-m", str(tiny_model()), "-o", str(tmp_path / "out"), "--probe-position", "middle")
    assert from_flag.returncode == 2
    message = from_flag.stderr.strip().splitlines()[-1].split("error: ", 1)[1]
    assert from_config.endswith(message), (from_config, message)


def test_well_typed_toml_config_is_used(tiny_model, tmp_path, data):
    proc = _run(
        tiny_model(), tmp_path / "out", data, 'targets = ["o_proj"]\ndry_run = true\nlayers = "0-1"\n', suffix=".toml"
    )
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout and not (tmp_path / "out").exists()
