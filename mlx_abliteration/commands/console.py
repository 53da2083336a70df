"""Renders pipeline events for people (progress bars, tables) or scripts (JSON lines)."""

from __future__ import annotations

import json
import sys

from ..core.tables import eval_text, layer_table
from ..pipeline import Event


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
        from tqdm import tqdm

        what = data["what"]
        bar = self.bars.get(what)
        if bar is None:
            bar = self.bars[what] = tqdm(total=data["total"], desc=what, unit="it", file=sys.stderr, leave=False)
        bar.n = data["done"]
        bar.refresh()
        if data["done"] >= data["total"]:
            bar.close()
            del self.bars[what]

    def close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
