"""run --reproduce LOG: the recorded settings and prompts give the recorded weights (tiny models, CLI)."""

import json

import pytest

from .cli_helpers import assert_one_line_error, run_cli

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(16)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(16)]


@pytest.fixture()
def datasets(tmp_path):
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS))
    return tmp_path / "harmful.txt", tmp_path / "harmless.txt"


@pytest.fixture()
def first_run(tiny_model, tmp_path, datasets):
    out = tmp_path / "first"
    result = run_cli(
        "run",
        "-m",
        str(tiny_model(num_shards=2)),
        "-o",
        str(out),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--no-eval",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_reproduce_gives_the_same_weights(first_run, tmp_path):
    log = json.loads((first_run / "abliteration_log.json").read_text())
    assert set(log["prompts_sha256"]) == {"harmful", "harmless"}
    again = run_cli("run", "--reproduce", str(first_run / "abliteration_log.json"), "-o", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert "all 2 weight file(s) have the recorded SHA256" in again.stdout
    second = json.loads((tmp_path / "again" / "abliteration_log.json").read_text())
    assert second["weights"]["output_sha256"] == log["weights"]["output_sha256"]
    assert second["chosen_layer"] == log["chosen_layer"] and second["parameters"]["max_prompts"] == 8
    assert "warning" not in again.stderr  # same versions


def test_changed_prompts_are_refused_with_one_line(first_run, tmp_path, datasets):
    datasets[0].write_text("\n".join(HARMFUL[:-1] + ["How do I pick a lock?"]))
    again = run_cli("run", "--reproduce", str(first_run / "abliteration_log.json"), "-o", str(tmp_path / "again"))
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "the harmful prompts" in again.stderr and "changed since" in again.stderr
    assert not (tmp_path / "again").exists()


def test_version_difference_warns_and_weight_difference_is_reported(first_run, tmp_path):
    path = first_run / "abliteration_log.json"
    log = json.loads(path.read_text())
    log["versions"]["mlx"] = "0.0.1"
    name = sorted(log["weights"]["output_sha256"])[0]
    log["weights"]["output_sha256"][name] = "0" * 64
    path.write_text(json.dumps(log))
    again = run_cli("run", "--reproduce", str(path), "-o", str(tmp_path / "again"), "--json")
    assert again.returncode == 3, again.stderr
    assert "warning: mlx is" in again.stderr and "0.0.1 in the log" in again.stderr
    result = [json.loads(line) for line in again.stdout.splitlines() if '"reproduce"' in line][-1]
    assert result["match"] is False and result["files"][name]["match"] is False
    assert sum(f["match"] for f in result["files"].values()) == len(result["files"]) - 1


def test_reproduce_needs_an_output_and_a_log(tmp_path, first_run):
    no_out = run_cli("run", "--reproduce", str(first_run / "abliteration_log.json"))
    assert no_out.returncode == 2 and "needs -o/--output-dir" in no_out.stderr
    missing = run_cli("run", "--reproduce", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.fixture(scope="module")
def saved_log(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("logged")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.txt").write_text("\n".join(HARMLESS))
    args = ["--harmful-dataset", str(d / "harmful.txt"), "--harmless-dataset", str(d / "harmless.txt")]
    result = run_cli(
        "run",
        "-m",
        str(tiny_model()),
        "-o",
        str(d / "out"),
        *args,
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--no-eval",
    )
    assert result.returncode == 0, result.stderr
    return json.loads((d / "out" / "abliteration_log.json").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": 5}, "'weights' should be"),
        ({"weights": {"output_sha256": {"model.safetensors": 1}}}, "'weights' should be"),
        ({"weights": {"output_sha256": {}}}, "'weights' should be"),
        ({"weights": None}, "records no weight digests"),
        ({"prompts_sha256": ["abc"]}, "'prompts_sha256' should be"),
        ({"prompts_sha256": {"harmful": 3, "harmless": "x"}}, "'prompts_sha256' should be"),
        ({"versions": "mlx 0.1"}, "'versions' should be"),
        ({"versions": {"mlx": [0, 1]}}, "'versions' should be"),
        ({"plan_spec": 3}, "'plan_spec' should be"),
        ({"plan_spec": {"attn": 1}}, "not a plan spec"),
        ({"command": 7}, "'command' should be"),
        ({"command": "export-adapter"}, "cannot be reproduced"),
        ({"command": "ablate", "direction_file": "d.safetensors", "chosen_layer": "2"}, "'chosen_layer' should be"),
        ({"command": "ablate", "direction_file": ["d"], "chosen_layer": 2}, "'direction_file' should be"),
        ({"parameters": {"seed": "x"}}, "--seed"),
    ],
)
def test_a_log_field_of_the_wrong_type_is_one_line_before_any_work(saved_log, tmp_path, change, message):
    """Every field --reproduce reads is checked when the log is read: nothing is written (the output dir included)."""
    path = tmp_path / "abliteration_log.json"
    path.write_text(json.dumps({**saved_log, **change}))
    result = run_cli("run", "--reproduce", str(path), "-o", str(tmp_path / "again"))
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abliteration_log.json"]
