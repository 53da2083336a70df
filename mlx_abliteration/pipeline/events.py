"""Progress of a flow as events: what the CLI prints, the GUI streams and the JSON log records."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

log = logging.getLogger("mlx_abliteration.pipeline")


@dataclass
class Event:
    """``kind``: stage | progress | info | layers | eval | done | error."""

    kind: str
    message: str = ""
    data: dict = field(default_factory=dict)


class Cancelled(Exception):
    """Raised inside the pipeline when the caller asked it to stop."""


class FollowerRankDone(Exception):
    """Under ``mlx.launch``: this rank's share of the probing is merged, and rank 0 does the rest (choosing
    the plan, evaluating, saving); the follower stops here instead of repeating that work for nothing."""

    def __init__(self, rank: int, size: int):
        super().__init__(f"rank {rank} of {size}: probing share merged; rank 0 chooses the plan, evaluates and saves")
        self.rank, self.size = rank, size


EventSink = Callable[[Event], None]


def release_buffer_cache() -> None:
    """Hand MLX's cached buffers back between phases (and after a run).

    MLX keeps freed buffers for reuse; on a GPU the cache grew to 135 GiB of a
    141 GiB card over one run although its peak use was 31 GiB. Each phase
    starts from what is really in use, so the process holds no more than that.
    Unreachable cycles are collected first: arrays they hold would otherwise go back
    to the cache whenever the collector happens to run, after it was emptied.
    """
    if "mlx.core" in sys.modules:  # nothing to release before MLX is used (and no import just for this)
        gc.collect()
        sys.modules["mlx.core"].clear_cache()


class Reporter:
    """Progress of a flow as ``Event``s to one sink (the CLI's ``Console``, the GUI's stream, a list in tests).

    ``emit`` also logs every non-progress event (JSON log) and, like ``progress``, raises ``Cancelled``
    once ``cancel`` is set, so a run stops at its next step or progress update.
    """

    def __init__(self, on_event: EventSink | None = None, cancel: threading.Event | None = None):
        self.on_event = on_event or (lambda event: None)
        self.cancel = cancel

    def emit(self, kind: str, message: str = "", **data: Any) -> None:
        if kind != "done":  # once saved, a late cancel must not report failure
            self.check()
        if kind in ("stage", "done"):
            release_buffer_cache()
        if kind != "progress":
            log.info(message, extra={"extra_info": {"event": kind, **data}})
        self.on_event(Event(kind, message, data))

    def progress(self, done: int, total: int, what: str) -> None:
        self.emit("progress", what, done=done, total=total, what=what)

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user")
