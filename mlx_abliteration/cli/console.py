"""Renders pipeline events for people (progress bars, tables) or scripts (JSON lines)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from mlx_abliteration.evaluation.tables import eval_text, layer_table
from mlx_abliteration.pipeline.events import Event


class ProgressMeter:
    """Rate and time left of a count of work units, the clock started at the first update.

    What a stage reports first has often cost nothing (a batch served from a
    cache or a shared prefix, a layer already probed): counting it against
    the time since the bar appeared gives absurd rates (millions of it/s) and
    ETAs. The units done by the first update are left out and the clock
    starts there, so from the second update on the rate is that of real
    work. A count that goes back (the stage restarted) starts it again.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def update(self, done: int) -> None:
        now = self.clock()
        if self.start is None or self.last is None or done < self.last[1]:
            self.start = (now, done)
        self.last = (now, done)

    @property
    def rate(self) -> float | None:
        """Units per second since the first update; None until a unit was done after it."""
        if self.start is None or self.last is None:
            return None
        units, seconds = self.last[1] - self.start[1], self.last[0] - self.start[0]
        return units / seconds if units > 0 and seconds > 0 else None

    def eta(self, total: int) -> float | None:
        """Seconds left for ``total`` units at the measured rate; None while unknown."""
        rate = self.rate
        if rate is None or self.last is None:
            return None
        return max(total - self.last[1], 0) / rate


def _bar(total: int, what: str, meter: ProgressMeter):
    """A tqdm bar whose rate and time left are ``meter``'s (one place for every stage's bar)."""

    class MeteredBar(tqdm):
        @property
        def format_dict(self):
            data = super().format_dict
            data["rate"] = meter.rate  # None: tqdm shows "?" rather than guessing from the free first update
            if meter.start is not None:
                data["elapsed"] = max(meter.clock() - meter.start[0], 0.0)
                data["initial"] = meter.start[1]
            return data

    return MeteredBar(total=total, desc=what, unit="it", file=sys.stderr, leave=False, smoothing=0)


class Console:
    """Consumes ``Event``s: tqdm bars with ETA on stderr, tables on stdout."""

    def __init__(self, quiet: bool = False, as_json: bool = False):
        self.quiet, self.as_json = quiet, as_json
        self.bars: dict = {}
        self.evals: dict = {}

    def __call__(self, event: Event) -> None:
        if self.as_json:
            print(json.dumps({"event": event.kind, "message": event.message, **event.data}, default=str), flush=True)
            return
        if event.kind == "progress":
            self._progress(event.data)
            return
        self.close_bars()
        if self.quiet:
            return
        if event.kind == "layers":
            print(layer_table(event.data["stats"], event.data.get("chosen"), event.data.get("candidates")))
        elif event.kind == "eval":
            self.evals[event.data["which"]] = event.data["report"]
            if event.data["which"] == "after":
                print(eval_text(self.evals.get("before"), self.evals["after"]))
        elif event.kind in ("stage", "info"):
            print(f"[{event.kind}] {event.message}", file=sys.stderr, flush=True)

    def _progress(self, data: dict) -> None:
        if self.quiet:
            return
        what = data["what"]
        if what not in self.bars:
            meter = ProgressMeter()
            self.bars[what] = (_bar(data["total"], what, meter), meter)
        bar, meter = self.bars[what]
        meter.update(data["done"])
        bar.n = data["done"]
        bar.refresh()
        if data["done"] >= data["total"]:
            bar.close()
            del self.bars[what]

    def close_bars(self) -> None:
        for bar, _ in self.bars.values():
            bar.close()
        self.bars.clear()
