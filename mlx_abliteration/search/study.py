"""Automatic parameter search: an Optuna study over ablation plans, scored on refusals and KL.

The search space is ``space``, a trial's score ``scorer``, the front and the saved trial ``pareto``.

Each trial turns sampled numbers into a ``PlanSpec`` (``engine.strength_schedule``),
edits the in-memory model, counts refusals on harmful prompts (generation
stops at the first refusal marker), measures first-token KL(original ‖
edited) on harmless prompts, and reverts the edit exactly. Both objectives
are minimized; the study lives in a journal file, so a rerun continues it.

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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_abliteration.edit.strength_schedule import PlanSpec
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.runtime.utils import process_alive
from mlx_abliteration.search.pareto import (
    SPEC_ATTR,
    WARM_START_ATTR,
    TrialRow,
    dominance_test,
    finished_trials,
    trial_row,
)
from mlx_abliteration.search.scorer import TrialScore
from mlx_abliteration.search.space import SearchSpace, spec_params, suggest_spec

if TYPE_CHECKING:
    from optuna import Study
    from optuna.storages import JournalStorage
    from optuna.trial import FrozenTrial


OBJECTIVES = ("refusals", "kl")
OWNER_ATTR = "owner"  # host and pid of the process running a trial


# --- search space ----------------------------------------------------------


# --- scoring ------------------------------------------------------------------


# --- the study ----------------------------------------------------------------


def study_storage(path: Path) -> JournalStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


# What replaying a damaged journal raises inside Optuna: bad JSON or bytes (ValueError,
# UnicodeDecodeError), a line that is JSON but no journal operation (KeyError, TypeError,
# AssertionError "Should not reach", IndexError, AttributeError).
_CORRUPT = (ValueError, KeyError, TypeError, AssertionError, IndexError, AttributeError)


def _corrupt(path: Path, name: str, err: BaseException) -> UserError:
    detail = " ".join(str(err).split())[:160] or "no detail"
    return UserError(
        f"the search journal {path} is corrupt ({type(err).__name__}: {detail}); delete it or move it aside "
        f"(its finished trials are lost), or start a new study with --study-name NAME (not {name}) or another --study-dir"
    )


def _replayed_storage(path: Path, name: str) -> JournalStorage:
    """The journal's storage with every line replayed now, so a damaged file fails here, as one line."""
    try:
        storage = study_storage(path)
        storage.get_all_studies()  # reads and replays the whole file
        _check_last_line(path)
        _drop_partial_tail(path)
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        raise write_error(path, err) from err
    except _CORRUPT as err:
        raise _corrupt(path, name, err) from err
    return storage


def _drop_partial_tail(path: Path) -> None:
    """Cut an unterminated last line (a write cut short by a kill or a full disk). Optuna ignores it while it
    is last, but appends after it, and from then on the whole journal fails to load."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's appends take: no write is half done meanwhile
    lock.acquire()
    try:
        with open(path, "r+b") as handle:
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    finally:
        lock.release()


def _check_last_line(path: Path) -> None:
    """Optuna skips a bad *last* line (it may be still being written) and fails only once a line follows it,
    i.e. after this run appended to the damaged file: a complete last line must be JSON now."""
    if not path.is_file():
        return
    offset = max(0, path.stat().st_size - (1 << 20))  # a journal line is a few kB
    with open(path, "rb") as handle:
        handle.seek(offset)
        complete = handle.read().rpartition(b"\n")[0]
    if complete and (offset == 0 or b"\n" in complete):
        json.loads(complete.rpartition(b"\n")[2])


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
    storage = _replayed_storage(storage_path, name)
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
        if owner.get("host") == host and owner.get("pid") != os.getpid() and not process_alive(owner.get("pid")):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            stale += 1
    return stale


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
            result = score(spec, dominance_test(rows) if prune else None)
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
