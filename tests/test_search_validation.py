"""The saved trial is chosen on prompts no trial was scored on, and the default is kept unless beaten beyond noise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mlx_abliteration.config.defaults import AbliterationConfig, SearchSettings
from mlx_abliteration.edit.strength_schedule import Kernel, PlanSpec
from mlx_abliteration.pipeline.events import Reporter
from mlx_abliteration.search import validation
from mlx_abliteration.search.pareto import StudySummary, TrialRow
from mlx_abliteration.search.runner import run_search
from mlx_abliteration.search.scorer import TrialScore
from mlx_abliteration.search.validation import Validated, beats, choose_validated, validate_front, wilson_interval

from .test_search import _config, _settings, datasets  # noqa: F401  (the module's dataset fixture)


def _spec(index: float) -> PlanSpec:
    return PlanSpec("global", index, Kernel(1.0, 4.0, 1.0, 3.0), Kernel(1.0, 4.0, 1.0, 3.0))


def _validated(number, refusals, kl, total=64, label=""):
    """Per-prompt KL spread around ``kl`` as real ones are (the same spread for every trial: paired noise)."""
    spread = [((i * 37) % 11 - 5) * kl / 6 for i in range(total)]
    return Validated(
        number, label, refusals, total, [kl + d + 0.01 * ((i * number * 13) % 7 - 3) * kl for i, d in enumerate(spread)]
    )


def test_wilson_interval_is_sensible_at_the_edges():
    low, high = wilson_interval(0, 40)
    assert low == 0.0 and 0.05 < high < 0.1
    low, high = wilson_interval(40, 40)
    assert 0.9 < low < 0.95 and high == 1.0
    low, high = wilson_interval(2, 40)
    assert low < 0.05 < high


def test_a_one_refusal_difference_is_noise_a_large_one_is_not():
    default = _validated(0, 3, 0.05, label="fixed default")
    assert not beats(_validated(1, 2, 0.05), default)
    assert beats(_validated(1, 0, 0.05), _validated(0, 12, 0.05))


def test_lower_kl_counts_only_beyond_the_paired_noise():
    default = Validated(0, "fixed default", 2, 8, [0.05, 0.07, 0.03, 0.06, 0.04, 0.05, 0.06, 0.04])
    consistent = Validated(1, "", 2, 8, [k - 0.02 for k in default.kl_rows])
    noisy = Validated(2, "", 2, 8, [0.01, 0.11, 0.0, 0.1, 0.01, 0.09, 0.02, 0.04])
    assert beats(consistent, default)
    assert noisy.kl < default.kl and not beats(noisy, default)


def test_choice_keeps_the_default_unless_beaten():
    default = _validated(0, 3, 0.05, label="fixed default")
    chosen, reason = choose_validated([_validated(4, 2, 0.049)], default, max_kl=0.1)
    assert chosen is default and "not distinguishable" in reason
    better = _validated(5, 2, 0.03)
    better.kl_rows = [k - 0.02 for k in default.kl_rows]
    chosen, reason = choose_validated([_validated(4, 2, 0.049), better], default, max_kl=0.1)
    assert chosen is better and "beyond noise" in reason


def test_a_trial_that_wins_only_on_the_scoring_split_is_not_chosen(monkeypatch):
    """Trial 7 looks best on the scoring split (0 refusals); on the validation split it is worse than trial 3."""
    rows = [
        TrialRow(0, 4, 32, 0.05, 1.0, _spec(2.0), warm_start="fixed default"),
        TrialRow(3, 2, 32, 0.04, 1.0, _spec(2.5)),
        TrialRow(7, 0, 32, 0.03, 1.0, _spec(1.5)),
    ]
    on_validation = {2.0: (20, 0.05), 2.5: (2, 0.03), 1.5: (9, 0.06)}  # by direction_index: refusals, KL

    class ScriptedScorer:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, spec, dominated=None):
            refusals, kl = on_validation[spec.direction_index]
            return TrialScore(refusals, 64, kl, 0.0, 0, kl_rows=[kl] * 64)

    monkeypatch.setattr(validation, "TrialScorer", ScriptedScorer)
    monkeypatch.setattr(validation.steps, "storage_dtype", lambda source: None)
    monkeypatch.setattr(validation, "validation_prompt_sets", lambda config, start, size: (["h"] * 64, ["b"] * 64))
    events = []
    ctx = SimpleNamespace(
        config=AbliterationConfig(model="m"), report=Reporter(events.append), model=object(), tokenizer=None, source="m"
    )
    summary = StudySummary("s", "j", rows, False, [])
    chosen, record = validate_front(ctx, None, summary, SearchSettings(max_kl=0.1))
    assert chosen.number == 3, record
    assert record["chosen"] == 3 and {c["trial"] for c in record["candidates"]} == {0, 3, 7}
    assert any("saved trial 3" in e.message for e in events)


def test_search_records_its_validation(tiny_model, datasets, tmp_path):  # noqa: F811
    outcome = run_search(
        _config(tiny_model(), datasets, output_dir=str(tmp_path / "out"), no_eval=True),
        _settings(tmp_path, n_trials=3, validation_prompts=6, max_kl=100.0),
    )
    record = json.loads((tmp_path / "out" / "abliteration_log.json").read_text())["search"]
    validated = record["validation"]
    assert validated["prompts"] == 6 and len(validated["candidates"]) >= 2
    assert record["trial"] == validated["chosen"] == outcome.chosen.number
    assert record["selected_by"] == validated["reason"]
    for candidate in validated["candidates"]:
        low, high = candidate["refusal_rate_95"]
        assert 0 <= low <= candidate["refusals"] / candidate["total"] <= high <= 1


def test_validation_can_be_switched_off(tiny_model, datasets, tmp_path):  # noqa: F811
    run_search(
        _config(tiny_model(), datasets, output_dir=str(tmp_path / "out"), no_eval=True),
        _settings(tmp_path, n_trials=2, validation_prompts=0, max_kl=100.0),
    )
    record = json.loads((tmp_path / "out" / "abliteration_log.json").read_text())["search"]
    assert record["validation"] == {} and record["selected_by"].startswith("fewest refusals")


def test_negative_validation_prompts_are_refused():
    from mlx_abliteration.errors import UserError

    with pytest.raises(UserError, match="--validation-prompts"):
        SearchSettings(validation_prompts=-1)


def test_components_dimension_can_zero_either_branch_and_warm_starts_roundtrip():
    import optuna

    from mlx_abliteration.search.space import search_space, spec_params, suggest_spec

    space = search_space(8, list(range(8)), edit_embedding=False)
    assert space.components == ("both", "attn", "mlp")
    attn_only = PlanSpec("global", 3.0, Kernel(1.2, 4.0, 0.6, 3.0), Kernel(0.0, 4.0, 0.0, 3.0))
    for spec in (attn_only, _spec(3.0)):
        params = spec_params(spec, space)
        again = suggest_spec(optuna.trial.FixedTrial(params), space)
        assert again.attn == spec.attn and (again.mlp.max_weight == 0) == (spec.mlp.max_weight == 0)
    params = {**spec_params(_spec(3.0), space), "components": "mlp"}
    mlp_only = suggest_spec(optuna.trial.FixedTrial(params), space)
    assert mlp_only.attn.max_weight == 0 and mlp_only.mlp.max_weight > 0


def test_a_study_resumes_with_the_components_dimension(tiny_model, datasets, tmp_path):  # noqa: F811
    from mlx_abliteration.search.study import complete_trials, open_study

    settings = _settings(tmp_path, n_trials=2, validation_prompts=0, max_kl=100.0, warm_start=False, prune=False)
    first = run_search(_config(tiny_model(), datasets), settings)
    resumed = run_search(
        _config(tiny_model(), datasets),
        _settings(tmp_path, n_trials=4, validation_prompts=0, max_kl=100.0, warm_start=False, prune=False),
    )
    assert first.study.name == resumed.study.name
    study = open_study(tmp_path / "studies" / f"{resumed.study.name}.journal", resumed.study.name, 0, 2)
    trials = complete_trials(study)
    assert len(trials) == 4 and all(t.params["components"] in ("both", "attn", "mlp") for t in trials)
