"""Automatic parameter search: kernel plans, exact revert, persistence, seeding, CLI save and reproduction."""

import json
import os

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from mlx_abliteration.config.defaults import AbliterationConfig, SearchSettings
from mlx_abliteration.edit.in_memory import apply_plan
from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.edit.revertible_edit import TrialEditor
from mlx_abliteration.edit.strength_schedule import Kernel, PlanSpec, kernel_plan, load_plan_spec, uniform_spec
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.directions import RefusalDirections
from mlx_abliteration.search.pareto import TrialRow, choose_trial, pareto_front
from mlx_abliteration.search.runner import run_search
from mlx_abliteration.search.scorer import TrialScore
from mlx_abliteration.search.space import search_space
from mlx_abliteration.search.study import complete_trials, open_study, optimize

from .cli_helpers import run_cli

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(24)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(24)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("search_data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.txt").write_text("\n".join(HARMLESS))
    return d / "harmful.txt", d / "harmless.txt"


def _config(model, datasets, **kw) -> AbliterationConfig:
    base = dict(
        model=str(model),
        harmful_dataset=str(datasets[0]),
        harmless_dataset=str(datasets[1]),
        max_prompts=8,
        eval_size=4,
        eval_max_tokens=4,
    )
    return AbliterationConfig(**{**base, **kw})


def _settings(tmp_path, **kw) -> SearchSettings:
    return SearchSettings(
        **{
            "search_prompts": 6,
            "search_max_tokens": 4,
            "n_startup_trials": 2,
            "study_dir": str(tmp_path / "studies"),
            **kw,
        }
    )


def _directions(num_layers=4, hidden=64, seed=0) -> RefusalDirections:
    rows = mx.random.normal((num_layers, hidden), key=mx.random.key(seed))
    rows = rows / mx.linalg.norm(rows, axis=-1, keepdims=True)
    return RefusalDirections(list(range(num_layers)), rows, [], "mean-diff", num_layers)


SPEC = PlanSpec("per-layer", 1.4, Kernel(1.2, 2.0, 0.3, 1.5), Kernel(0.9, 1.0, 0.9, 3.0), 0.7, norm_preserve=True)


def test_kernel_falls_linearly_to_min_and_is_zero_beyond():
    assert Kernel(1.0, 2.0, 0.5, 2.0).weights(6) == [0.5, 0.75, 1.0, 0.75, 0.5, 0.0]
    assert Kernel(1.5, 0.5, 0.0, 1.0).weights(3) == [0.75, 0.75, 0.0]


def test_uniform_spec_is_the_fixed_plan():
    directions = _directions()
    fixed = uniform_plan(directions.direction(2), 4, 1.0, norm_preserve=True)
    plan = kernel_plan(directions, uniform_spec(2, 4, 1.0, norm_preserve=True))
    assert plan.strengths == fixed.strengths and plan.norm_preserve
    assert mx.array_equal(plan.layer_directions, fixed.layer_directions) and mx.array_equal(
        plan.embed_direction, fixed.embed_direction
    )


def test_per_layer_and_fractional_directions():
    directions = _directions()
    plan = kernel_plan(directions, SPEC)
    for layer in range(4):
        assert mx.allclose(plan.layer_directions[layer], directions.directions[layer], atol=1e-6)
    mixed = 0.6 * directions.directions[1] + 0.4 * directions.directions[2]
    assert mx.allclose(plan.embed_direction, mixed / mx.linalg.norm(mixed), atol=1e-6)
    assert plan.strengths["embed"] == [0.7] and plan.strengths["attn"][0] == 0.0
    assert plan.strengths["attn"][3] == pytest.approx(0.6)


def test_plan_spec_roundtrips_through_json(tmp_path):
    (tmp_path / "log.json").write_text(json.dumps({"plan_spec": SPEC.to_dict()}))
    assert load_plan_spec(tmp_path / "log.json") == SPEC


@pytest.mark.parametrize(
    "kwargs, precision, dequantize",
    [
        ({}, None, "auto"),
        ({"dtype": "bfloat16"}, None, "auto"),
        ({"bits": 4}, None, False),
        ({"bits": 4}, "bfloat16", False),
        ({"bits": 4}, None, True),
        ({"arch": "mixtral", "bits": 4}, None, False),
    ],
    ids=["float32", "bf16", "q4-packed", "q4-edited-bf16", "q4-dense-twin", "moe-q4"],
)
def test_apply_then_revert_restores_every_weight_bit_for_bit(tiny_model, kwargs, precision, dequantize, monkeypatch):
    import mlx_abliteration.edit.revertible_edit as revertible_edit

    monkeypatch.setattr(revertible_edit, "EMBED_BLOCK_ELEMENTS", 64 * 7)  # the embedding goes in blocks of 7 rows
    path = tiny_model(**kwargs)
    model, _, _ = load_model(path, dequantize=dequantize)
    plan = kernel_plan(_directions(), SPEC)
    before = dict(tree_flatten(model.parameters()))
    types = {p: type(m) for p, m in model.named_modules()}
    editor = TrialEditor(
        model, AbliterationConfig().targets, mx.bfloat16 if kwargs.get("dtype") == "bfloat16" else None, precision
    )
    editor.apply(plan)
    edited = dict(tree_flatten(model.parameters()))
    reference, _, _ = load_model(path, dequantize=dequantize)
    apply_plan(reference, plan, storage_dtype=editor.storage_dtype, edited_precision=precision)
    expected = dict(tree_flatten(reference.parameters()))
    assert edited.keys() == expected.keys()
    for key, value in expected.items():  # the same edit as apply_plan, in layers and embedding blocks
        assert edited[key].dtype == value.dtype and mx.allclose(edited[key], value, atol=1e-6), key
    assert any(k not in edited or not mx.array_equal(before[k], edited[k]) for k in before)
    editor.restore()
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and mx.array_equal(after[key], value), key
    assert {p: type(m) for p, m in model.named_modules()} == types


def test_originals_are_kept_compact_when_exact():
    from mlx_abliteration.edit.revertible_edit import compact

    exact = mx.array([1.0, -2.5, 0.0]).astype(mx.bfloat16).astype(mx.float32)
    assert compact(exact, mx.bfloat16).dtype == mx.bfloat16
    assert compact(mx.array([1.0 + 2**-20]), mx.bfloat16).dtype == mx.float32


def test_pareto_front_and_choice():
    rows = [
        TrialRow(n, r, 10, kl, 1.0, SPEC)
        for n, r, kl in [(0, 5, 0.02), (1, 2, 0.3), (2, 3, 0.05), (3, 3, 0.08), (4, 0, 0.9)]
    ]
    assert [r.number for r in pareto_front(rows)] == [4, 1, 2, 0]
    assert choose_trial(rows, 0.1).number == 2
    assert choose_trial(rows, 0.01) is None


def test_interrupt_keeps_finished_trials(tmp_path):
    study = open_study(tmp_path / "s.journal", "s", seed=1, n_startup_trials=2)
    calls = []

    def score(spec, dominated=None):
        calls.append(spec)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return TrialScore(len(calls), 8, 0.01 * len(calls), 0.1, 5)

    assert optimize(study, search_space(4, range(4), True), score, 5) is True
    assert len(complete_trials(study)) == 2 and len(study.trials) == 3
    assert (
        optimize(study, search_space(4, range(4), True), lambda spec, dominated: TrialScore(0, 8, 0.0, 0.1, 5), 4)
        is False
    )
    assert len(complete_trials(study)) == 4


def test_dominated_trials_stop_early_and_count_towards_the_budget(tmp_path):
    from optuna.trial import TrialState

    study = open_study(tmp_path / "s.journal", "s", seed=1, n_startup_trials=2)
    scores = iter([(3, 0.05), (1, 0.01), (0, 0.2), (5, 0.02)])  # (refusals, KL) each trial would reach

    def score(spec, dominated):
        refusals, kl = next(scores)
        for count in range(refusals + 1):  # refusals accumulate while generating
            if dominated(kl, count):
                return TrialScore(count, 8, kl, 0.1, 0, pruned=True)
        return TrialScore(refusals, 8, kl, 0.1, 5)

    assert optimize(study, search_space(4, range(4), True), score, 4) is False
    # trial 1 dominates trial 0; trial 3 is stopped at 1 refusal, where trial 1 (1, 0.01) dominates it
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert study.trials[3].user_attrs["refusals_at_least"] == 1


def test_trials_of_a_killed_run_are_marked_failed(tmp_path):
    import subprocess
    import sys

    from optuna.trial import TrialState

    from mlx_abliteration.search.study import OWNER_ATTR, _owner, fail_stale_trials

    study = open_study(tmp_path / "s.journal", "s", seed=1, n_startup_trials=2)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout
    for pid in (int(dead), _owner()["pid"]):
        study.ask().set_user_attr(OWNER_ATTR, {**_owner(), "pid": pid})
    assert fail_stale_trials(study) == 1
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]


def _trials(outcome):
    rows = sorted(outcome.study.rows + outcome.study.pruned, key=lambda r: r.number)
    return [(r.number, r.refusals, r.kl, r.spec, r.pruned) for r in rows]


def test_search_persists_resumes_and_same_seed_gives_same_trials(tiny_model, datasets, tmp_path):
    model = tiny_model()
    first = run_search(_config(model, datasets), _settings(tmp_path, n_trials=2))
    assert len(_trials(first)) == 2 and first.scored_on == "search-split"
    default, mpoa = sorted(first.study.rows + first.study.pruned, key=lambda r: r.number)
    assert default.warm_start == "fixed default" and default.spec == uniform_spec(default.spec.direction_index, 4, 1.0)
    assert mpoa.spec == uniform_spec(default.spec.direction_index, 4, 1.0, norm_preserve=True)
    events = []
    resumed = run_search(_config(model, datasets), _settings(tmp_path, n_trials=4), events.append)
    assert resumed.study.name == first.study.name and len(_trials(resumed)) == 4
    assert any("directions of this study read" in e.message for e in events)  # probed once per study
    assert _trials(resumed)[:2] == _trials(first)
    # The same commands with the same seed in another study dir: the same trials, resumed run included.
    again = run_search(_config(model, datasets), _settings(tmp_path / "other", n_trials=2))
    assert again.study.storage != first.study.storage and _trials(again) == _trials(first)
    again = run_search(_config(model, datasets), _settings(tmp_path / "other", n_trials=4))
    assert _trials(again) == _trials(resumed)


def test_edited_dataset_starts_a_new_study_and_probes_again(tiny_model, tmp_path):
    model = tiny_model()
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL))
    harmless.write_text("\n".join(HARMLESS))
    first = run_search(_config(model, (harmful, harmless)), _settings(tmp_path, n_trials=1))
    harmful.write_text("\n".join(p.replace("weapon", "bomb") for p in HARMFUL))  # same file, new prompts
    events = []
    second = run_search(_config(model, (harmful, harmless)), _settings(tmp_path, n_trials=1), events.append)
    assert second.study.name != first.study.name
    assert not any("directions of this study read" in e.message for e in events)


def test_cli_search_saves_a_trial_and_run_reproduces_it(tiny_model, datasets, tmp_path):
    model = tiny_model(bits=4, num_shards=2)
    outcome = run_search(_config(model, datasets), _settings(tmp_path, n_trials=3))
    number = max(r.number for r in outcome.study.rows)  # a complete trial
    common = [
        "-m",
        str(model),
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
    ]
    search = [
        "search",
        *common,
        "--search-prompts",
        "6",
        "--search-max-tokens",
        "4",
        "--n-trials",
        "3",
        "--n-startup-trials",
        "2",
        "--study-dir",
        str(tmp_path / "studies"),
    ]
    proc = run_cli(*search, "--trial", str(number), "-o", str(tmp_path / "best"))
    assert proc.returncode == 0, proc.stderr
    assert f"saved trial {number}" in proc.stdout and "continuing study" in proc.stderr
    log = json.loads((tmp_path / "best" / "abliteration_log.json").read_text())
    assert log["search"]["trial"] == number and log["search"]["finished_trials"] == 3
    assert log["metrics"]["after"]["kl"] is not None and "--plan-json" in log["reproduce"]
    model, tok = mlx_lm.load(str(tmp_path / "best"))
    assert isinstance(mlx_lm.generate(model, tok, prompt="hi", max_tokens=2), str)
    proc = run_cli(
        "run",
        *common,
        "--plan-json",
        str(tmp_path / "best" / "abliteration_log.json"),
        "-o",
        str(tmp_path / "again"),
        "--no-eval",
    )
    assert proc.returncode == 0, proc.stderr
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (tmp_path / "best" / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes()


def test_search_rejects_bad_settings_and_unknown_trials(tiny_model, datasets, tmp_path):
    config = _config(tiny_model(), datasets)
    with pytest.raises(UserError, match="--n-trials must be an integer of at least 1"):
        run_search(config, _settings(tmp_path, n_trials=0))
    with pytest.raises(UserError, match="no finished trials"):
        run_search(config, _settings(tmp_path, trial=3))
    run_search(config, _settings(tmp_path, n_trials=1))
    with pytest.raises(UserError, match="trial 3 is not a finished trial"):
        run_search(config, _settings(tmp_path, n_trials=1, trial=3))


def test_run_auto_delegates_to_the_search(tiny_model, datasets, tmp_path, monkeypatch, capsys):
    from mlx_abliteration.cli import search
    from mlx_abliteration.cli.main import main

    monkeypatch.setattr(search, "settings_from_args", lambda args: _settings(tmp_path, n_trials=2, max_kl=1e9))
    argv = [
        "run",
        "--auto",
        "-m",
        str(tiny_model()),
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
        "-o",
        str(tmp_path / "auto"),
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped early" in out and "saved trial" in out
    assert json.loads((tmp_path / "auto" / "abliteration_log.json").read_text())["search"]["finished_trials"] == 2


def test_corrupt_search_journal_is_a_one_line_error(tmp_path):
    from mlx_abliteration.search.study import open_study

    journal = tmp_path / "study.journal"
    journal.write_bytes(b"{not json at all\n\x00\x01\xff")
    with pytest.raises(UserError, match="search journal .* is corrupt"):
        open_study(journal, "study", 0, 4)
    assert journal.read_bytes().startswith(b"{not json")  # left as it was: the user decides


@pytest.mark.parametrize(
    "damage",
    [
        b'{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n{"op_code": 99}\n',
        b"\x00\xffgarbage\n",
    ],
    ids=["foreign-operation", "garbage-last-line"],
)
def test_cli_search_with_a_corrupt_journal_is_one_line_naming_the_file(tiny_model, datasets, tmp_path, damage):
    """Issue 26: a damaged Optuna journal was reported as an internal error (or made worse by an append)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    journal = studies / "mine.journal"
    journal.write_bytes(damage)
    proc = run_cli(
        "search",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--study-dir",
        str(studies),
        "--study-name",
        "mine",
        "--n-trials",
        "1",
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("[")]  # not progress
    assert len(lines) == 1 and lines[0].startswith("error: the search journal"), proc.stderr
    assert str(journal) in lines[0] and "delete it" in lines[0] and "--study-name" in lines[0]
    assert journal.read_bytes() == damage  # left as it was: the user decides
    assert sorted(os.listdir(studies)) == ["mine.journal"]


def test_journal_with_a_half_written_last_line_still_opens_and_takes_new_trials(tmp_path):
    """A write cut short (kill, full disk) leaves an unterminated line; appending after it would corrupt the file."""
    from mlx_abliteration.search.study import open_study

    journal = tmp_path / "s.journal"
    study = open_study(journal, "s", 0, 2)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, [1.0, 2.0])
    with open(journal, "ab") as handle:
        handle.write(b'{"op_code": 4, "worker_id"')
    study = open_study(journal, "s", 0, 2)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, [0.5, 1.0])
    assert len(open_study(journal, "s", 0, 2).trials) == 2


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--study-dir", "a_file", "is a file"), ("--study-name", "../escape", "plain file name")],
)
def test_cli_search_checks_the_study_dir_and_name_first(tiny_model, datasets, tmp_path, flag, value, needle):
    (tmp_path / "a_file").write_text("x")
    studies = ["--study-dir", str(tmp_path / "studies")] if flag != "--study-dir" else []
    proc = run_cli(
        "search",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        *studies,
        flag,
        str(tmp_path / value) if flag == "--study-dir" else value,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()  # not even "[stage] resolving model": checked first
    assert len(lines) == 1 and flag in lines[0] and needle in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_full_disk_while_the_study_writes_is_one_line_and_the_study_resumes(
    tiny_model, datasets, tmp_path, monkeypatch
):
    """Issue 26: a journal append failing (full disk) was an internal error."""
    import errno

    from optuna.storages.journal import JournalFileBackend

    real, calls = JournalFileBackend.append_logs, {"n": 0}

    def half_then_full(self, logs):
        calls["n"] += 1
        if calls["n"] < 12:
            return real(self, logs)
        with open(self._file_path, "ab") as handle:
            handle.write(b'{"op_code": 5, "trial')  # half a line, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JournalFileBackend, "append_logs", half_then_full)
    config = _config(tiny_model(), datasets)
    with pytest.raises(UserError, match=r"cannot write .*studies.* \(No space left on device\).*rerun to continue"):
        run_search(config, _settings(tmp_path, n_trials=3))
    monkeypatch.setattr(JournalFileBackend, "append_logs", real)
    outcome = run_search(config, _settings(tmp_path, n_trials=3))
    assert len(outcome.study.rows) + len(outcome.study.pruned) == 3
