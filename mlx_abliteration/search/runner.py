"""The search as a run of the one pipeline (``mlx-abliterate search``, ``run --auto``): ``SearchTrial`` is its plan source.

Probing happens once; every trial edits the loaded model and reverts it
(``search.study``). Trials are scored on a *search split*: prompts left over
after the held-out evaluation prompts and the probing prompts are cut (the
same shuffle as ``run``), so neither the direction nor the held-out numbers
that ``eval`` reports are fitted by the search. A dataset without spare
prompts falls back to the probing prompts.

The saved trial's ``PlanSpec`` goes into ``abliteration_log.json``;
``run --plan-json LOG`` with the same settings rebuilds the same plan from
the same directions, so the same weights, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlx_abliteration.config.defaults import AbliterationConfig, SearchSettings, check_strength
from mlx_abliteration.data.prompt_selection import scan_prompts
from mlx_abliteration.edit.strength_schedule import PlanSpec, uniform_spec
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.judge import judge_identity
from mlx_abliteration.evaluation.refusals import DEFAULT_REFUSAL_MARKERS, REFUSAL_RULE_VERSION
from mlx_abliteration.io.atomic_write import atomic_path, is_user_write_failure, write_error
from mlx_abliteration.io.output_dir import check_work_dir
from mlx_abliteration.pipeline import flow as pipeline
from mlx_abliteration.pipeline import steps
from mlx_abliteration.pipeline.plan_sources import PlanChoice, PlanSource, RunContext, spec_choice
from mlx_abliteration.probe.directions import load_directions, save_directions
from mlx_abliteration.runtime.utils import cache_root
from mlx_abliteration.search.pareto import StudySummary, TrialRow, choose_trial, find_trial, finished_trials, trial_row
from mlx_abliteration.search.scorer import TrialScorer, refusal_judge
from mlx_abliteration.search.space import SPACE_VERSION, SearchSpace, search_space
from mlx_abliteration.search.study import (
    complete_trials,
    ensure_warm_starts,
    fail_stale_trials,
    open_study,
    optimize,
    study_key,
)
from mlx_abliteration.search.validation import validate_front

# Settings that never change a trial's score (so they do not start a new study).
_UNSCORED = (
    "output_dir",
    "overwrite",
    "dry_run",
    "no_eval",
    "no_cache",
    "cache_dir",
    "eval_max_tokens",
    "capability_questions",
)
# Settings that shape or score the edit but not the probing (directions are shared across them).
_EDIT_ONLY = (
    "use_layer",
    "ablation_strength",
    "ablate_layers",
    "targets",
    "norm_preserve",
    "edited_precision",
    "kl_tokens",
    "judge",
)


@dataclass
class SearchOutcome:
    study: StudySummary
    chosen: TrialRow | None
    settings: SearchSettings
    scored_on: str = ""
    output_dir: str | None = None
    before: dict | None = None
    after: dict | None = None
    record: dict = field(default_factory=dict)


def run_search(
    config: AbliterationConfig, settings: SearchSettings | None = None, on_event=None, cancel=None
) -> SearchOutcome:
    """Probe once, run (or resume) the study, pick a trial and save it if ``config.output_dir`` is set.

    The one pipeline (``pipeline.run_pipeline``) with a ``SearchTrial`` as its plan source: the chosen
    trial is evaluated and saved exactly like ``run``'s plan.
    """
    trial = SearchTrial(settings or SearchSettings())
    result = pipeline.run_pipeline(config, on_event, cancel, plan_source=trial)
    outcome = SearchOutcome(trial.summary, trial.chosen, trial.settings, trial.scored_on)
    if result.output_dir:
        outcome.output_dir, outcome.record, outcome.before, outcome.after = (
            result.output_dir,
            result.record,
            result.before,
            result.after,
        )
    return outcome


class SearchTrial(PlanSource):
    """``search`` / ``run --auto``: the plan of a study's trial (the search runs in ``choose``)."""

    output_optional = True  # without -o the study runs and its front is printed; nothing is saved

    def __init__(self, settings: SearchSettings):
        self.settings = settings
        self.summary: StudySummary | None = None
        self.chosen: TrialRow | None = None
        self.scored_on = ""

    def check(self, config: AbliterationConfig) -> None:
        if config.streamed:
            raise UserError(
                "the search edits and scores the loaded model; --probe-mode streamed cannot be searched (use memory)"
            )
        name = self.settings.study_name
        if name is not None and (not name.strip() or any(c in name for c in "/\\\0") or name in (".", "..")):
            raise UserError(f"--study-name {name!r} must be a plain file name (no folders); use --study-dir for where")
        check_work_dir(study_dir(config, self.settings), "--study-dir")  # before the model is resolved or loaded

    def prepare(self, ctx: RunContext) -> None:
        prompts = prompts_fingerprint(ctx.config)
        with journal_writes(study_dir(ctx.config, self.settings)):
            self.study, self.storage_path = _open(ctx.source, ctx.config, self.settings, prompts, ctx.report)
        key = study_key(probe_identity(ctx.source, ctx.config, prompts))
        self.cache = self.storage_path.parent / f"{Path(ctx.source).name}-{key}.directions.safetensors"

    def directions(self, ctx: RunContext):
        return _directions(ctx.model, ctx.tokenizer, ctx.prompt_sets(), ctx.config, ctx.source, self.cache, ctx.report)

    def choose(self, ctx: RunContext, directions) -> PlanChoice | None:
        study, settings = self.study, self.settings
        self.scored_on, interrupted = study.user_attrs.get("scored_on", ""), False
        if settings.trial is None:
            with journal_writes(self.storage_path):
                self.scored_on, interrupted = _search(
                    study,
                    ctx.model,
                    ctx.tokenizer,
                    ctx.source,
                    ctx.prompt_sets(),
                    directions,
                    ctx.config,
                    settings,
                    ctx.report,
                    ctx.writers,
                )
        rows = [trial_row(t) for t in complete_trials(study)]
        pruned = [trial_row(t) for t in finished_trials(study) if t.state.name == "PRUNED"]
        self.summary = StudySummary(study.study_name, str(self.storage_path), rows, interrupted, pruned)
        self.chosen = (
            find_trial(rows, settings.trial) if settings.trial is not None else choose_trial(rows, settings.max_kl)
        )
        self.validation: dict = {}
        if settings.trial is None and not interrupted and self.chosen is not None:
            self.chosen, self.validation = validate_front(ctx, directions, self.summary, settings)
        chosen = self.chosen
        ctx.report.emit(
            "front", "Pareto front", front=[r.to_dict() for r in self.summary.front], chosen=chosen and chosen.number
        )
        if chosen is None or not ctx.config.output_dir or ctx.config.dry_run:
            return None
        return spec_choice(
            ctx,
            directions,
            chosen.spec,
            {"search": _search_record(self.summary, chosen, settings, self.scored_on, self.validation)},
        )


# --- study ------------------------------------------------------------------


@contextlib.contextmanager
def journal_writes(path: Path) -> Iterator[None]:
    """A failed journal write the user can fix (full disk, quota) is one line naming the journal; the
    trials finished before it stay in the file (a line cut short is dropped when the study is next opened)."""
    try:
        yield
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        reason = str(write_error(path, err)).split(" — ")[0]
        raise UserError(f"{reason} — the search journal keeps the trials finished so far; rerun to continue") from err


def prompts_fingerprint(config: AbliterationConfig) -> str:
    """Hash of both prompt sets' contents: an edited dataset file (or a new
    packaged set) must not resume a study or reuse directions probed on the old one."""

    cache = Path(config.cache_dir) if config.cache_dir else None
    digest = hashlib.sha256()
    for kind, source in (("harmful", config.harmful_dataset), ("harmless", config.harmless_dataset)):
        scan_prompts(source, kind, cache, config.dataset_column).feed(digest)  # json.dumps of the list, streamed
    return digest.hexdigest()[:16]


def probe_identity(source: Path, config: AbliterationConfig, prompts: str) -> dict:
    """Everything the directions depend on (every setting but those that only shape or score the edit)."""
    probed = {k: v for k, v in config.to_dict().items() if k not in _UNSCORED + _EDIT_ONLY}
    return {"source": str(Path(source).resolve()), "config": probed, "prompts": prompts}


def study_identity(source: Path, config: AbliterationConfig, settings: SearchSettings, prompts: str) -> dict:
    scored = {k: v for k, v in config.to_dict().items() if k not in _UNSCORED and k != "judge"}
    judge = steps.judge_path(config)  # keyword studies keep the identity they had before --judge existed
    extra = {} if judge is None else {"judge": judge_identity(judge)}
    return {
        **extra,
        "source": str(Path(source).resolve()),
        "config": scored,
        "prompts": prompts,
        "refusal_markers": hashlib.sha256("\n".join(DEFAULT_REFUSAL_MARKERS).encode()).hexdigest()[:16],
        "refusal_rule": REFUSAL_RULE_VERSION,
        "space_version": SPACE_VERSION,
        "search_prompts": settings.search_prompts,
        "search_max_tokens": settings.search_max_tokens,
        "warm_start": settings.warm_start,
    }


def study_dir(config: AbliterationConfig, settings: SearchSettings) -> Path:
    if settings.study_dir:
        return Path(settings.study_dir).expanduser()
    return cache_root(config.cache_dir) / "studies"


def _open(source: Path, config: AbliterationConfig, settings: SearchSettings, prompts: str, report):
    identity = study_identity(source, config, settings, prompts)
    name = settings.study_name or f"{Path(source).name}-{study_key(identity)}"
    path = study_dir(config, settings) / f"{name}.journal"
    seed = config.seed if settings.search_seed is None else settings.search_seed
    study = open_study(path, name, seed, settings.n_startup_trials)
    if "identity" not in study.user_attrs:
        study.set_user_attr("identity", identity)
    stale = fail_stale_trials(study)
    if stale:
        report.emit("info", f"{stale} trial(s) of a killed run marked failed")
    done = len(finished_trials(study))
    if settings.trial is not None and not complete_trials(study):
        raise UserError(
            f"study {name} has no finished trials in {path}; run the search first (same settings, without --trial)"
        )
    verb = "continuing" if done else "starting"
    report.emit(
        "info", f"{verb} study {name} ({done} finished trials) in {path}", study=name, storage=str(path), finished=done
    )
    return study, path


def _directions(model, tokenizer, data, config, source, cache: Path, report):
    """Probe once per model and probing settings: a resumed study (or --trial, or a study with other
    search settings) reads the directions instead of probing again."""

    if cache.is_file():
        report.emit("info", f"directions of this study read from {cache}")
        return load_directions(cache)[0]
    directions = steps.probe_directions(model, tokenizer, data, config, report, source)
    with atomic_path(cache, suffix=".safetensors") as partial:  # a killed run or a full disk leaves no half a cache
        save_directions(partial, directions, directions.layers[0])
    return directions


def _search(study, model, tokenizer, source, data, directions, config, settings, report, writers) -> tuple[str, bool]:
    space, warm = _space(study, model, tokenizer, directions, data, config, settings, source, report, writers)
    for label in ensure_warm_starts(study, warm, space):
        spec = warm[label]
        report.emit(
            "info",
            f"trial queued: {label} (layer {spec.direction_index:g}, strength {spec.attn.max_weight:g} on every writer)",
        )
    harmful, harmless, scored_on = search_prompt_sets(config, settings.search_prompts)
    study.set_user_attr("scored_on", scored_on)
    report.emit("info", f"scoring trials on {len(harmful)}+{len(harmless)} {scored_on} prompts")
    # One batch for all prompts unless --batch-size says otherwise: decoding on
    # the CPU is bound by reading the weights, once per step however many rows.
    scorer = TrialScorer(
        model,
        tokenizer,
        directions,
        harmful,
        harmless,
        targets=config.targets,
        storage_dtype=steps.storage_dtype(source),
        edited_precision=config.edited_precision,
        max_tokens=settings.search_max_tokens,
        batch_size=config.batch_size,
        system_prompt=config.system_prompt,
        kl_tokens=config.kl_tokens,
    )

    def on_trial(row: TrialRow, done: int) -> None:
        phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in row.timings.items())
        outcome = f"refusals {row.refusals}/{row.total}, KL {row.kl:.4f}"
        if row.pruned:
            outcome = f"dominated, stopped (KL {row.kl:.4f}, refusals >= {row.refusals})"
        report.emit(
            "info",
            f"trial {row.number} ({done}/{settings.n_trials}): {outcome}, {row.seconds:.1f}s ({phases})",
            trial=row.to_dict(),
        )
        report.progress(done, settings.n_trials, "trials")

    with refusal_judge(config, report) as scorer.judge:  # loaded for the trials, freed after them
        if scorer.judge is not None:
            report.emit("info", f"trials scored by the judge {config.judge} (whole answers, then one judging pass)")
        interrupted = optimize(study, space, scorer, settings.n_trials, on_trial, settings.prune)
    if interrupted:
        report.emit("info", "interrupted: finished trials are kept; rerun the same command to continue")
    return scored_on, interrupted


def _space(
    study, model, tokenizer, directions, data, config, settings, source, report, writers
) -> tuple[SearchSpace, dict[str, PlanSpec]]:
    """The study's search space and warm-start specs, decided once and stored with the study."""
    if "space" in study.user_attrs:
        warm = {label: PlanSpec.from_dict(spec) for label, spec in (study.user_attrs.get("warm_specs") or {}).items()}
        return SearchSpace.from_dict(study.user_attrs["space"]), warm
    edit_embedding = any(w.role == "embed" for w in writers.values())
    warm = {}
    if settings.warm_start and str(config.ablate_layers).strip().lower() == "all":
        layer, _ = steps.choose_layer(model, tokenizer, directions, data, config, source, report, writers)
        strength = check_strength(config.ablation_strength)
        variants = [("fixed default", config.norm_preserve)]
        if not config.norm_preserve:
            variants.append(("fixed default, --norm-preserve", True))
        warm = {
            label: uniform_spec(layer, directions.num_model_layers, strength, edit_embedding, np)
            for label, np in variants
        }
    space = search_space(
        directions.num_model_layers, directions.layers, edit_embedding, list(warm.values()), config.norm_preserve
    )
    study.set_user_attr("space", space.to_dict())
    study.set_user_attr("warm_specs", {label: spec.to_dict() for label, spec in warm.items()})
    return space, warm


def search_prompt_sets(config: AbliterationConfig, size: int) -> tuple[list[str], list[str], str]:
    """Harmful and harmless prompts that score trials, and which split they come from."""

    cache = Path(config.cache_dir) if config.cache_dir else None
    sets, spare_everywhere = [], True
    for kind, source in (("harmful", config.harmful_dataset), ("harmless", config.harmless_dataset)):
        scan = scan_prompts(source, kind, cache, config.dataset_column)
        take = (config.max_prompts or scan.count) + size  # rest[:max_prompts] and the spare ones after it
        rest = scan.split(None, config.eval_size, config.seed, name=source or f"default {kind}", take=take)[0]
        spare = rest[config.max_prompts :]
        spare_everywhere = spare_everywhere and bool(spare)
        sets.append((spare[:size], rest[: config.max_prompts][:size]))
    if spare_everywhere:
        return sets[0][0], sets[1][0], "search-split"
    return sets[0][1], sets[1][1], "probing"


# --- record ---------------------------------------------------------------------


def _search_record(
    summary: StudySummary, chosen: TrialRow, settings: SearchSettings, scored_on: str, validation: dict
) -> dict:
    return {
        "study_name": summary.name,
        "storage": summary.storage,
        "trial": chosen.number,
        "selected_by": f"--trial {settings.trial}"
        if settings.trial is not None
        else validation.get("reason") or f"fewest refusals with KL <= {settings.max_kl:g}",
        "validation": validation,
        "scores": {"refusals": chosen.refusals, "total": chosen.total, "kl": chosen.kl},
        "scored_on": scored_on,
        "finished_trials": len(summary.rows) + len(summary.pruned),
        "stopped_early": len(summary.pruned),
        "seconds_per_trial": summary.seconds_per_trial,
        "settings": settings.to_dict(),
        "pareto_front": [r.to_dict() for r in summary.front],
    }
