"""Template-driven dataset generator: schema errors, determinism, packaged sets, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_abliteration.data.datasets import default_dataset_path, load_prompts
from mlx_abliteration.data.generator import generate_pairs, write_datasets
from mlx_abliteration.data.templates import TemplateError, default_template_file, load_template_set, parse_template_set
from mlx_abliteration.errors import UserError

REPO = Path(__file__).resolve().parent.parent

SMALL_YAML = """\
version: 1
generation_config:
  num_samples: 6
  seed: 7
templates:
  - id: how
    prompt: "How do I {task}?"
  - id: steps
    prompt: "Explain step by step how to {task}."
  - id: write
    prompt: "Write {artifact}.{marker}"
  - id: legacy
    prompt: "Tell me how to {behavior}."
concepts:
  - name: locks
    category: theft
    harmful:
      task: [pick a neighbor's lock to steal from them, steal a parked car]
      artifact: a plan for a burglary
    harmless:
      task: [fix a sticky lock, wash a parked car]
      artifact: a plan for a picnic
  - name: legacy
    harmful_value: make a weapon
    harmless_value: make a kite
"""


def _write(tmp_path: Path, text: str, name: str = "templates.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_abliteration", "generate-dataset", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=60,
    )


# --- schema -----------------------------------------------------------------


def test_small_template_set_parses_slots_and_legacy_shorthand():
    template_set = parse_template_set(SMALL_YAML)
    assert [t.slots for t in template_set.templates] == [("task",), ("task",), ("artifact",), ("behavior",)]
    legacy = template_set.concepts[1]
    assert legacy.values["harmful"] == {"behavior": ("make a weapon",)}
    assert (template_set.num_samples, template_set.seed) == (6, 7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("templates:\n  - id: a\n    prompt: x: y\n", ":3: invalid YAML (mapping values are not allowed here)"),
        ("templates: []\nconcepts: []\n", ":1: templates: expected a non-empty list"),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\n    promt: y\nconcepts: []\n",
            ":4: templates[0].promt: unknown key",
        ),
        ("templates:\n  - id: a\n    prompt: 'x'\nconcepts: []\n", ":3: templates[0].prompt: uses no {slot}"),
        ("templates:\n  - id: a\n    prompt: 'x {task!r}'\nconcepts: []\n", ":3: templates[0].prompt: bad placeholder"),
        ("templates:\n  - id: a\n    prompt: 'x {task'\nconcepts: []\n", ":3: templates[0].prompt: bad braces"),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\nconcepts:\n  - name: c\n    harmful: {task: a}\n",
            ":5: concepts[0]: missing required key 'harmless'",
        ),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\nconcepts:\n  - name: c\n"
            "    harmful: {task: a}\n    harmless: {topic: b}\n",
            ":7: concepts[0].harmless: slots ['topic'] differ",
        ),
        (
            "templates:\n  - id: a\n    prompt: 'x {tsak}'\nconcepts:\n  - name: c\n"
            "    harmful: {task: a}\n    harmless: {task: b}\n",
            ":3: templates[0].prompt: no concept defines all of its slots ['tsak']",
        ),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\nconcepts:\n  - name: c\n"
            "    harmful:\n      task: [a, a]\n    harmless: {task: b}\n",
            ":7: concepts[0].harmful.task[1]: duplicate value 'a'",
        ),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\nconcepts:\n  - name: c\n"
            "    harmful: {task: a}\n    harmless: {task: ''}\n",
            ":7: concepts[0].harmless.task[0]: expected a non-empty string, got nothing",
        ),
        (
            "templates:\n  - id: a\n    prompt: 'x {task}'\nconcepts:\n  - name: c\n"
            "    harmful: {task: a}\n    harmless: {task: b}\n  - name: d\n    harmful_value: a\n    harmless_value: b\n",
            ":8: concepts[1]: no template uses only its slots ['behavior']",
        ),
        (
            "generation_config:\n  num_samples: many\ntemplates:\n  - id: a\n    prompt: 'x {task}'\n"
            "concepts:\n  - name: c\n    harmful: {task: a}\n    harmless: {task: b}\n",
            ":2: generation_config.num_samples: expected an integer >= 1, got 'many'",
        ),
        ("version: 2\ntemplates: []\nconcepts: []\n", ":1: version: unsupported version"),
        ("templates: []\ntemplates: []\nconcepts: []\n", ":2: templates file.templates: duplicate key"),
        ("", "empty template file"),
    ],
)
def test_schema_errors_name_the_key_and_line(text, expected):
    with pytest.raises(TemplateError) as info:
        parse_template_set(text, source="t.yaml")
    message = str(info.value)
    assert message.startswith("t.yaml") and expected in message
    assert "\n" not in message


def test_missing_template_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found; pass an existing --template-file"):
        load_template_set(tmp_path / "nope.yaml")


# --- generation ----------------------------------------------------------------


def test_generation_is_deterministic_paired_and_unique():
    template_set = parse_template_set(SMALL_YAML)
    first = generate_pairs(template_set, 6, seed=3)
    assert first == generate_pairs(template_set, 6, seed=3)
    assert first != generate_pairs(template_set, 6, seed=4)
    harmful, harmless = first["harmful"], first["harmless"]
    assert len({r["prompt"] for r in harmful}) == len({r["prompt"] for r in harmless}) == 6
    for bad, good in zip(harmful, harmless):
        assert (bad["template"], bad["concept"], bad["pair"]) == (good["template"], good["concept"], good["pair"])
        assert bad["kind"] == "harmful" and good["kind"] == "harmless"
        assert set(bad) >= {"values", "seed", "generator", "templates_sha256", "harm_category"}


def test_generation_spreads_over_concepts_and_templates():
    template_set = load_template_set(default_template_file())
    harmful = generate_pairs(template_set, 200, seed=1)["harmful"]
    assert len({r["concept"] for r in harmful}) == len(template_set.concepts)
    assert len({r["template"] for r in harmful}) == len(template_set.templates)


def test_too_many_samples_is_a_user_error():
    with pytest.raises(UserError, match="only 6 unique prompt pairs but 50 were requested; lower --num-samples"):
        generate_pairs(parse_template_set(SMALL_YAML), 50, seed=0)


def test_probe_marker_fills_placeholder_and_appends():
    template_set = parse_template_set(SMALL_YAML)
    plain = generate_pairs(template_set, 6, seed=0)["harmful"]
    assert all("{marker}" not in r["prompt"] and not r["prompt"].endswith(" ") for r in plain)
    filled = generate_pairs(template_set, 6, seed=0, probe_marker="<M>")["harmful"]
    assert any(r["prompt"].endswith(".<M>") for r in filled)
    appended = generate_pairs(template_set, 6, seed=0, probe_marker="<M>", append_marker=True)["harmful"]
    assert all(r["prompt"].endswith(" <M>") and r["marker"] == "<M>" for r in appended)


def test_append_marker_without_marker_is_a_user_error():
    with pytest.raises(UserError, match="pass --probe-marker TEXT"):
        generate_pairs(parse_template_set(SMALL_YAML), 2, seed=0, append_marker=True)


def test_write_refuses_existing_files_without_overwrite(tmp_path):
    records = generate_pairs(parse_template_set(SMALL_YAML), 2, seed=0)
    paths = write_datasets(records, tmp_path)
    before = paths["harmful"].read_text()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        write_datasets(generate_pairs(parse_template_set(SMALL_YAML), 3, seed=0), tmp_path)
    assert paths["harmful"].read_text() == before
    write_datasets(generate_pairs(parse_template_set(SMALL_YAML), 3, seed=0), tmp_path, overwrite=True)
    assert len(_jsonl(paths["harmful"])) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["harmful_dataset.jsonl", "harmless_dataset.jsonl"]


# --- packaged default sets -------------------------------------------------------


def test_packaged_sets_are_reproducible_from_packaged_templates():
    template_set = load_template_set(default_template_file())
    packaged = {kind: _jsonl(default_dataset_path(kind)) for kind in ("harmful", "harmless")}
    seed = packaged["harmful"][0]["seed"]
    assert packaged["harmful"][0]["templates_sha256"] == template_set.sha256, "regenerate the packaged sets"
    regenerated = generate_pairs(template_set, len(packaged["harmful"]), seed)
    assert regenerated == packaged


def test_packaged_sets_are_large_unique_and_disjoint():
    harmful, harmless = load_prompts(None, "harmful"), load_prompts(None, "harmless")
    assert len(harmful) >= 300 and len(harmless) >= 300
    for kind in ("harmful", "harmless"):
        assert len(_jsonl(default_dataset_path(kind))) == len(harmful)  # no duplicates dropped on load
    assert not set(harmful) & set(harmless)


def test_packaged_templates_are_diverse():
    template_set = load_template_set(default_template_file())
    assert len(template_set.concepts) >= 60
    assert len(template_set.templates) >= 15
    assert len({c.category for c in template_set.concepts}) >= 15


# --- CLI ------------------------------------------------------------------------


def test_cli_writes_both_files(tmp_path):
    template_file = _write(tmp_path, SMALL_YAML)
    out = tmp_path / "out"
    result = _cli("--template-file", str(template_file), "--num-samples", "4", "--output-dir", str(out), "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 harmful and 4 harmless prompts" in result.stdout
    assert [len(_jsonl(out / f"{kind}_dataset.jsonl")) for kind in ("harmful", "harmless")] == [4, 4]
    assert _jsonl(out / "harmful_dataset.jsonl")[0]["seed"] == 5


def test_cli_defaults_to_the_packaged_templates(tmp_path):
    result = _cli("--num-samples", "10", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert len(_jsonl(tmp_path / "harmless_dataset.jsonl")) == 10


def test_cli_bad_yaml_fails_with_one_line_and_writes_nothing(tmp_path):
    template_file = _write(
        tmp_path, SMALL_YAML.replace('    prompt: "How do I {task}?"', '    promt: "How do I {task}?"')
    )
    out = tmp_path / "out"
    result = _cli("--template-file", str(template_file), "--output-dir", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: templates.yaml:7: templates[0].promt: unknown key; allowed: id, prompt")
    assert not out.exists()


def test_cli_existing_output_needs_overwrite(tmp_path):
    template_file = _write(tmp_path, SMALL_YAML)
    assert _cli("--template-file", str(template_file), "--output-dir", str(tmp_path / "o")).returncode == 0
    before = (tmp_path / "o" / "harmful_dataset.jsonl").read_text()
    result = _cli("--template-file", str(template_file), "--output-dir", str(tmp_path / "o"), "--seed", "9")
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    assert (tmp_path / "o" / "harmful_dataset.jsonl").read_text() == before
    result = _cli(
        "--template-file", str(template_file), "--output-dir", str(tmp_path / "o"), "--seed", "9", "--overwrite"
    )
    assert result.returncode == 0


def test_cli_append_marker(tmp_path):
    template_file = _write(tmp_path, SMALL_YAML)
    result = _cli(
        "--template-file",
        str(template_file),
        "--output-dir",
        str(tmp_path),
        "--num-samples",
        "3",
        "--probe-marker",
        "</think>",
        "--append-marker",
    )
    assert result.returncode == 0, result.stderr
    assert all(r["prompt"].endswith(" </think>") for r in _jsonl(tmp_path / "harmless_dataset.jsonl"))


def test_root_shim_matches_the_seed_usage(tmp_path):
    _write(tmp_path, SMALL_YAML)  # templates.yaml in the working dir, as the seed's usage names it
    result = subprocess.run(
        [sys.executable, str(REPO / "generate_dataset.py"), "--template-file", "templates.yaml", "--num-samples", "5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(_jsonl(tmp_path / "generated_datasets" / "harmful_dataset.jsonl")) == 5
