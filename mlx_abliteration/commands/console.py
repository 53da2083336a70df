"""Renders pipeline events for people (progress bars, tables) or scripts (JSON lines)."""

from __future__ import annotations

import json
import sys

from ..pipeline import Event


def layer_table(stats: list[dict], chosen: int | None, candidates: list[dict] | None = None) -> str:
    scored = {c["layer"]: c for c in candidates or []}
    head = f"{'layer':>5}  {'norm':>9}  {'rel.norm':>8}  {'cos':>6}  {'separation':>10}"
    if scored:
        head += f"  {'refusal p':>9}  {'KL':>7}"
    lines = [head]
    for s in stats:
        line = f"{s['layer']:>5}  {s['norm']:>9.3f}  {s['relative_norm']:>8.3f}  {s['cosine']:>6.3f}  {s['separation']:>10.3f}"
        if scored:
            c = scored.get(s["layer"])
            line += f"  {c['refusal_prob']:>9.3f}  {c['kl']:>7.3f}" if c else f"  {'':>9}  {'':>7}"
        if s["layer"] == chosen:
            line += "  <= chosen"
        lines.append(line)
    return "\n".join(lines)


EVAL_COLUMNS = ("metric", "before", "after")


def eval_rows(before: dict | None, after: dict | None) -> list[tuple[str, str, str]]:
    """(metric, before, after) cells of the evaluation reports; shared by the CLI table and the GUI."""

    def cell(report, n, total):
        if not report or report.get(n) is None:
            return "-"
        return f"{report[n]}/{report[total]} ({report[n] / max(report[total], 1):.0%})"

    rows = [
        ("refusals, harmful", lambda r: cell(r, "harmful_refusals", "harmful_total")),
        ("refusals, harmless", lambda r: cell(r, "harmless_refusals", "harmless_total")),
        ("KL vs original", lambda r: "-" if not r or r.get("kl") is None else f"{r['kl']:.4f}"),
        ("tokens/s", lambda r: "-" if not r else f"{r['tokens_per_s']:.1f}"),
    ]
    return [(name, fn(before), fn(after)) for name, fn in rows]


def eval_table(before: dict | None, after: dict | None) -> str:
    lines = [f"{'':<20}  {'before':>16}  {'after':>16}"]
    for name, b, a in eval_rows(before, after):
        lines.append(f"{name:<20}  {b:>16}  {a:>16}")
    return "\n".join(lines)


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
                print(eval_table(self.evals.get("before"), self.evals["after"]))
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
