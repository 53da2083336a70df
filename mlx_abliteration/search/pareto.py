"""The Pareto front of a study: its finished trials as rows, which trial dominates which, the one saved, and the table printed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mlx_abliteration.edit.strength_schedule import Kernel, PlanSpec
from mlx_abliteration.errors import UserError

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import FrozenTrial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import FrozenTrial


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


def dominance_test(rows: Sequence[TrialRow]) -> Callable[[float, int], bool]:
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


WARM_START_ATTR = "warm_start"


SPEC_ATTR = "plan_spec"
