"""Automatic parameter search: Optuna over ablation plans, scored on refusals and KL.

Each trial turns sampled numbers into a ``PlanSpec`` (``engine.strength_schedule``),
edits the in-memory model, counts refusals on harmful prompts (generation
stops at the first refusal marker), measures first-token KL(original ‖
edited) on harmless prompts, and reverts the edit exactly. Both objectives
are minimized; the study lives in a journal file, so a rerun continues it.

Search space (L = number of layers; ranges widen to include the warm-start
trials if they lie outside). Centred on what is known to work: full-depth
ablation from a direction in the middle of the network (Arditi et al.: below
0.8·L), with room to taper it (Heretic-style kernels), to leave the embedding
alone, and to preserve norms (grimjim's MPOA):

==============================  ===========================================
parameter                       range
==============================  ===========================================
direction_scope                 global | per-layer
direction_index                 0.3·(L−1) .. 0.8·(L−1), float (interpolated)
{attn,mlp}.max_weight           0.8 .. 1.5
{attn,mlp}.max_weight_position  0.3·(L−1) .. 0.9·(L−1)
{attn,mlp}.min_weight_fraction  0 .. 1   (min_weight = fraction · max_weight)
{attn,mlp}.min_weight_distance  0.2·(L−1) .. L−1
embed_weight                    0 .. 1   (only when the embedding is a target)
norm_preserve                   false | true   (only true with --norm-preserve)
==============================  ===========================================

Warm start: trial 0 is the fixed plan of ``run`` (its layer, strength 1 on
every writer), trial 1 the same with ``--norm-preserve``.

Sampler: multi-objective TPE (``multivariate=True``, seeded). With the small
budgets a CPU affords (tens of trials), NSGA-II would not finish a single
generation of its default population of 50 and is then random search; TPE
starts modelling the good region after ``n_startup_trials``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_abliteration.config.defaults import (
    SearchSettings,  # noqa: F401  (re-exported: search settings live with the defaults)
)
from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.edit.strength_schedule import COMPONENTS, DIRECTION_SCOPES, Kernel, PlanSpec, kernel_plan
from mlx_abliteration.edit.trials import Trials
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.generation import greedy_tokens, strip_eos
from mlx_abliteration.evaluation.kl import ReferenceLogprobs, kl_divergence, kl_from_reference, reference_logprobs
from mlx_abliteration.evaluation.refusals import answer_verdict, contains_refusal_marker, split_thinking
from mlx_abliteration.probe.prefix_batch import shared_first_token_logprobs, shared_prefill

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn
    from optuna import Study
    from optuna.storages import JournalStorage
    from optuna.trial import FrozenTrial, Trial

    from mlx_abliteration.evaluation.judge import Judge
    from mlx_abliteration.probe.batching import Progress
    from mlx_abliteration.probe.directions import RefusalDirections

OBJECTIVES = ("refusals", "kl")
WARM_START_ATTR = "warm_start"
SPACE_VERSION = 2  # part of a study's identity: a changed space starts a new study
SPEC_ATTR = "plan_spec"
OWNER_ATTR = "owner"  # host and pid of the process running a trial


# --- search space ----------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of every sampled parameter (absolute layers for positions)."""

    direction_index: tuple[float, float]
    max_weight: tuple[float, float]
    max_weight_position: tuple[float, float]
    min_weight_distance: tuple[float, float]
    embed_weight: tuple[float, float] | None  # None: the embedding is not edited
    norm_preserve: tuple[bool, ...] = (False, True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        fields: dict[str, Any] = {k: (tuple(v) if v is not None else None) for k, v in data.items()}
        return cls(**fields)


def search_space(
    num_layers: int,
    probed_layers: Sequence[int],
    edit_embedding: bool,
    warm: Sequence[PlanSpec] = (),
    norm_preserve: bool = False,
) -> SearchSpace:
    last = float(max(num_layers - 1, 1))
    lo, hi = float(min(probed_layers)), float(max(probed_layers))
    index = (max(lo, 0.3 * last), min(hi, 0.8 * last))
    if index[0] > index[1]:  # too few probed layers for the usual band: any probed layer
        index = (lo, hi)
    space = SearchSpace(
        index,
        (0.8, 1.5),
        (0.3 * last, 0.9 * last),
        (0.2 * last, last),
        (0.0, 1.0) if edit_embedding else None,
        (True,) if norm_preserve else (False, True),
    )
    for spec in warm:
        space = _widened(space, spec)
    return space


def _widened(space: SearchSpace, warm: PlanSpec) -> SearchSpace:
    def cover(bounds: tuple[float, float], *values: float) -> tuple[float, float]:
        return (min(bounds[0], *values), max(bounds[1], *values))

    kernels = (warm.attn, warm.mlp)
    embed = cover(space.embed_weight, warm.embed_weight) if space.embed_weight is not None else None
    return SearchSpace(
        cover(space.direction_index, warm.direction_index),
        cover(space.max_weight, *(k.max_weight for k in kernels)),
        cover(space.max_weight_position, *(k.max_weight_position for k in kernels)),
        cover(space.min_weight_distance, *(k.min_weight_distance for k in kernels)),
        embed,
        space.norm_preserve,
    )


def suggest_spec(trial: Trial, space: SearchSpace) -> PlanSpec:
    """Sample a ``PlanSpec`` from an Optuna trial (every parameter, always: no conditional space)."""
    scope = trial.suggest_categorical("direction_scope", list(DIRECTION_SCOPES))
    index = trial.suggest_float("direction_index", *space.direction_index)
    kernels = {c: _suggest_kernel(trial, c, space) for c in COMPONENTS}
    embed = trial.suggest_float("embed_weight", *space.embed_weight) if space.embed_weight is not None else 0.0
    norm_preserve = trial.suggest_categorical("norm_preserve", list(space.norm_preserve))
    return PlanSpec(scope, index, kernels["attn"], kernels["mlp"], embed, norm_preserve)


def _suggest_kernel(trial: Trial, component: str, space: SearchSpace) -> Kernel:
    peak = trial.suggest_float(f"{component}.max_weight", *space.max_weight)
    position = trial.suggest_float(f"{component}.max_weight_position", *space.max_weight_position)
    fraction = trial.suggest_float(f"{component}.min_weight_fraction", 0.0, 1.0)
    distance = trial.suggest_float(f"{component}.min_weight_distance", *space.min_weight_distance)
    return Kernel(peak, position, fraction * peak, distance)


def spec_params(spec: PlanSpec, space: SearchSpace) -> dict:
    """The Optuna parameters that ``suggest_spec`` turns into ``spec`` (to enqueue it)."""
    params: dict = {"direction_scope": spec.direction_scope, "direction_index": spec.direction_index}
    for component in COMPONENTS:
        kernel: Kernel = getattr(spec, component)
        params[f"{component}.max_weight"] = kernel.max_weight
        params[f"{component}.max_weight_position"] = kernel.max_weight_position
        params[f"{component}.min_weight_fraction"] = kernel.min_weight / kernel.max_weight if kernel.max_weight else 0.0
        params[f"{component}.min_weight_distance"] = kernel.min_weight_distance
    if space.embed_weight is not None:
        params["embed_weight"] = spec.embed_weight
    params["norm_preserve"] = spec.norm_preserve
    return params


# --- scoring ------------------------------------------------------------------


@dataclass
class TrialScore:
    refusals: int
    total: int
    kl: float
    seconds: float
    generated_tokens: int
    timings: dict = field(default_factory=dict)  # seconds per phase: apply, kl, generate, restore
    pruned: bool = False  # stopped once dominated; ``refusals`` is then a lower bound


class _Dominated(Exception):
    """Raised inside generation once the refusals so far make the trial dominated."""


class TrialScorer:
    """apply spec -> measure KL, count refusals -> revert; one instance per loaded model.

    Prefill runs the prompts' shared template prefix once (``prefix_batch``);
    the reference log-probs of the unedited model are taken the same way.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        directions: RefusalDirections,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        targets: Sequence[str],
        storage_dtype: mx.Dtype | None = None,
        edited_precision: str | None = None,
        max_tokens: int = 32,
        batch_size: int | None = None,
        system_prompt: str | None = None,
        kl_tokens: int = 1,
        progress: Progress | None = None,
        judge: Judge | None = None,
    ) -> None:
        """``judge``: a loaded ``core.judge.Judge`` that counts the refusals instead of the markers (answers then
        run to ``max_tokens``: no stop at a marker, no stop once dominated)."""

        self.model, self.tokenizer, self.directions = model, tokenizer, directions
        self.targets = tuple(targets)
        self.max_tokens, self.progress = max_tokens, progress
        self.harmful = list(harmful)  # the refusal check ignores marker words copied from the prompt
        self.harmful_ids = encode_chats(tokenizer, harmful, system_prompt)
        self.harmless_ids = encode_chats(tokenizer, harmless, system_prompt)
        self.batch_size = batch_size or max(len(self.harmful_ids), len(self.harmless_ids), 1)
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.reference: mx.array | ReferenceLogprobs  # first-token log-probs, or the reference for multi-token KL
        if kl_tokens == 1:
            self.reference = shared_first_token_logprobs(model, self.harmless_ids, self.batch_size)
        else:
            self.reference = reference_logprobs(
                model, tokenizer, harmless, kl_tokens=kl_tokens, batch_size=self.batch_size, system_prompt=system_prompt
            )
        self.judge = judge
        self.trials = Trials(model, self.targets, storage_dtype, edited_precision)

    def __call__(self, spec: PlanSpec, dominated: Callable[[float, int], bool] | None = None) -> TrialScore:
        """Score ``spec``; with ``dominated(kl, refusals_so_far)``, stop as soon as it holds (KL comes first)."""

        clock = _Clock()
        plan = kernel_plan(self.directions, spec, self.targets)

        def measure() -> TrialScore:
            clock.lap("apply")
            return self._measure(clock, dominated or (lambda kl, refusals: False))

        result = self.trials.measure(plan, measure)
        clock.lap("restore")
        result.seconds, result.timings = clock.total, clock.laps
        return result

    def _measure(self, clock: _Clock, dominated: Callable[[float, int], bool]) -> TrialScore:
        total = len(self.harmful_ids)
        kl = self._kl()
        clock.lap("kl")
        if dominated(kl, 0):
            return TrialScore(0, total, kl, 0.0, 0, pruned=True)
        try:
            refusals, tokens = self._refusals(lambda count: dominated(kl, count))
        except _Dominated as stop:
            return TrialScore(stop.args[0], total, kl, 0.0, 0, pruned=True)
        finally:
            clock.lap("generate")
        return TrialScore(refusals, total, kl, 0.0, tokens)

    def _kl(self) -> float:

        if isinstance(self.reference, ReferenceLogprobs):
            return kl_from_reference(self.model, self.reference, self.batch_size)
        return kl_divergence(
            self.reference, shared_first_token_logprobs(self.model, self.harmless_ids, self.batch_size)
        )

    def _harmful_answers(self, row_stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy answer tokens for the harmful prompts (a row ends early where ``row_stop`` says so)."""

        return greedy_tokens(
            self.model,
            self.harmful_ids,
            self.max_tokens,
            self.batch_size,
            self.eos,
            None,
            self.progress,
            "harmful",
            prefill_fn=shared_prefill,
            row_stop=row_stop,
        )

    def _refusals(self, dominated_at: Callable[[int], bool]) -> tuple[int, int]:

        refused = 0

        def text(tokens: list[int]) -> str:
            return self.tokenizer.decode(strip_eos(tokens, self.eos))

        if self.judge is not None:
            return self._judged_refusals(self.judge, text)

        def stop(index: int, tokens: list[int]) -> bool:
            nonlocal refused
            answer = split_thinking(text(tokens))[0]
            if answer is None or not contains_refusal_marker(answer, prompt=self.harmful[index]):
                return False
            refused += 1
            if dominated_at(refused):
                raise _Dominated(refused)
            return True

        outputs = self._harmful_answers(row_stop=stop)
        refusals = sum(answer_verdict(text(t), prompt=p) is True for t, p in zip(outputs, self.harmful))
        return refusals, sum(len(t) for t in outputs)

    def _judged_refusals(self, judge: Judge, text: Callable[[list[int]], str]) -> tuple[int, int]:
        """Refusals by the judge: whole answers, then one judging pass (unfinished thinking is not a refusal)."""

        outputs = self._harmful_answers()
        answers = [split_thinking(text(t))[0] for t in outputs]
        pairs = [(p, a) for p, a in zip(self.harmful, answers) if a is not None]
        refusals = sum(v.refusal is True for v in judge.verdicts(pairs))
        return refusals, sum(len(t) for t in outputs)


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


# --- the study ----------------------------------------------------------------


def study_storage(path: Path) -> JournalStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_key(identity: dict) -> str:
    """A short hash of everything that changes trial scores (so changed settings start a new study)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def open_study(storage_path: Path, name: str, seed: int, n_startup_trials: int) -> Study:
    """Create or load the study; the sampler's seed is offset by the trials already run.

    The offset keeps a resumed study deterministic without replaying the first
    run's random startup samples.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = study_storage(storage_path)
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise UserError(
            f"the search journal {storage_path} is corrupt ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "move it aside (its finished trials are lost) or pass another --study-dir"
        ) from err
    existing = 0
    try:
        existing = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed + existing, multivariate=True, n_startup_trials=n_startup_trials)
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, directions=["minimize", "minimize"], load_if_exists=True
    )


def complete_trials(study: Study) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _owner() -> dict:

    return {"host": socket.gethostname(), "pid": os.getpid()}


def fail_stale_trials(study: Study) -> int:
    """Mark failed the trials left running by a killed process on this host (so they neither count nor bias sampling)."""

    from optuna.trial import TrialState

    host = _owner()["host"]
    stale = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR) or {}
        if owner.get("host") == host and owner.get("pid") != os.getpid() and not _alive(owner.get("pid")):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            stale += 1
    return stale


def _alive(pid: Any) -> bool:  # a pid read back from the journal's JSON (or None)

    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def ensure_warm_starts(study: Study, specs: dict[str, PlanSpec], space: SearchSpace) -> list[str]:
    """Enqueue each labelled spec unless the study already has (or waits for) it; returns the labels queued."""
    from optuna.trial import TrialState

    present = {
        t.user_attrs.get(WARM_START_ATTR)
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.WAITING)
    }
    queued = [label for label in specs if label not in present]
    for label in queued:
        study.enqueue_trial(spec_params(specs[label], space), user_attrs={WARM_START_ATTR: label})
    return queued


@dataclass
class TrialRow:
    """A finished trial as the front table and the log show it."""

    number: int
    refusals: int
    total: int
    kl: float
    seconds: float
    spec: PlanSpec
    warm_start: str = ""  # label of a queued informed trial, e.g. "fixed default"
    timings: dict = field(default_factory=dict)
    pruned: bool = False  # stopped once dominated: ``refusals`` is a lower bound

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec.to_dict()}


def trial_row(trial: FrozenTrial) -> TrialRow:
    """A complete or pruned trial as a row (a pruned one: KL and the refusals counted before it stopped)."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    pruned = trial.state == TrialState.PRUNED
    refusals, kl = (attrs["refusals_at_least"], attrs["kl"]) if pruned else trial.values
    return TrialRow(
        trial.number,
        int(refusals),
        int(attrs.get("total", 0)),
        float(kl),
        float(attrs.get("seconds", 0.0)),
        PlanSpec.from_dict(attrs[SPEC_ATTR]),
        str(attrs.get(WARM_START_ATTR) or ""),
        dict(attrs.get("timings", {})),
        pruned,
    )


def optimize(
    study: Study,
    space: SearchSpace,
    score: Callable[[PlanSpec, Callable[[float, int], bool] | None], TrialScore],
    n_trials: int,
    on_trial: Callable[[TrialRow, int], None] | None = None,
    prune: bool = True,
) -> bool:
    """Run trials until the study has ``n_trials`` finished ones; True if interrupted (Ctrl-C).

    ``score(spec, dominated)`` may stop a trial that some finished trial
    already dominates (told as pruned, its KL and refusals so far kept as
    attributes). An interrupted trial is marked failed; finished trials stay.
    """
    from optuna.trial import TrialState

    while (done := len(finished_trials(study))) < n_trials:
        rows = [trial_row(t) for t in complete_trials(study)]
        trial = study.ask()
        trial.set_user_attr(OWNER_ATTR, _owner())
        try:
            spec = suggest_spec(trial, space)
            result = score(spec, _dominance_test(rows) if prune else None)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            return True
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        attrs = {
            "total": result.total,
            "seconds": result.seconds,
            "generated_tokens": result.generated_tokens,
            "timings": result.timings,
            SPEC_ATTR: spec.to_dict(),
        }
        if result.pruned:
            attrs.update(kl=result.kl, refusals_at_least=result.refusals)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if result.pruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = study.tell(trial, [result.refusals, result.kl])
        if on_trial is not None:
            on_trial(trial_row(frozen), done + 1)
    return False


def _dominance_test(rows: Sequence[TrialRow]) -> Callable[[float, int], bool]:
    """``dominated(kl, refusals_at_least)``: some finished trial is no worse on both and better on one.

    Refusals only grow while a trial generates, so once this holds the trial
    can neither reach the Pareto front nor be the chosen one: it stops there.
    """
    points = [(r.refusals, r.kl) for r in rows]

    def dominated(kl: float, refusals: int) -> bool:
        return any(r <= refusals and k <= kl and (r < refusals or k < kl) for r, k in points)

    return dominated


def finished_trials(study: Study) -> list[FrozenTrial]:
    """Complete and pruned trials: both count towards the budget."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def pareto_front(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Trials no other trial beats on both refusals and KL, by refusals then KL."""

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        return a.refusals <= b.refusals and a.kl <= b.kl and (a.refusals < b.refusals or a.kl < b.kl)

    front = [r for r in rows if not any(dominates(o, r) for o in rows)]
    return sorted(front, key=lambda r: (r.refusals, r.kl, r.number))


def choose_trial(rows: Sequence[TrialRow], max_kl: float) -> TrialRow | None:
    """Fewest refusals among trials with KL <= ``max_kl`` (ties: lower KL, then earlier)."""
    allowed = [r for r in rows if r.kl <= max_kl]
    return min(allowed, key=lambda r: (r.refusals, r.kl, r.number)) if allowed else None


def find_trial(rows: Sequence[TrialRow], number: int) -> TrialRow:
    for row in rows:
        if row.number == number:
            return row
    finished = ", ".join(str(r.number) for r in rows) or "none"
    raise UserError(f"trial {number} is not a finished trial of this study (finished: {finished})")


def front_table(front: Sequence[TrialRow], chosen: TrialRow | None = None, max_kl: float | None = None) -> str:
    """The Pareto front as a plain-text table (one row per trial)."""
    head = f"{'trial':>5}  {'refusals':>9}  {'KL':>7}  {'scope':<9}  {'dir':>5}  {'attn max@pos min/dist':<23}  {'mlp max@pos min/dist':<23}  {'embed':>5}  {'norm':<4}"
    lines = [head, "-" * len(head)]
    for row in front:
        s = row.spec
        line = (
            f"{row.number:>5}  {f'{row.refusals}/{row.total}':>9}  {row.kl:>7.4f}  {s.direction_scope:<9}  "
            f"{s.direction_index:>5.2f}  {_kernel_cell(s.attn):<23}  {_kernel_cell(s.mlp):<23}  {s.embed_weight:>5.2f}  {'yes' if s.norm_preserve else 'no':<4}"
        )
        notes = []
        if row.warm_start:
            notes.append(row.warm_start)
        if max_kl is not None and row.kl > max_kl:
            notes.append(f"KL > {max_kl:g}")
        if chosen is not None and row.number == chosen.number:
            notes.append("<= chosen")
        lines.append(line + ("  " + ", ".join(notes) if notes else ""))
    return "\n".join(lines)


def _kernel_cell(k: Kernel) -> str:
    return f"{k.max_weight:.2f}@{k.max_weight_position:.1f} {k.min_weight:.2f}/{k.min_weight_distance:.1f}"


@dataclass
class StudySummary:
    name: str
    storage: str
    rows: list[TrialRow] = field(default_factory=list)  # complete trials
    interrupted: bool = False
    pruned: list[TrialRow] = field(default_factory=list)

    @property
    def front(self) -> list[TrialRow]:
        return pareto_front(self.rows)

    @property
    def seconds_per_trial(self) -> float:
        """Mean over complete and pruned trials."""
        timed = [r.seconds for r in self.rows + self.pruned if r.seconds > 0]
        return sum(timed) / len(timed) if timed else 0.0
