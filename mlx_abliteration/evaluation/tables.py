"""The before/after evaluation table and the per-layer table, rendered once for every view.

``eval_rows`` holds the cells; the console (``run``, ``search``, ``eval``)
prints ``eval_text``, the model card embeds ``eval_markdown`` and the GUI
shows ``eval_rows`` as a DataFrame with ``EVAL_COLUMNS``. The reports are the
``EvalReport.to_dict()`` dicts that pipeline events and ``abliteration_log.json``
carry (an ``EvalReport`` works too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from mlx_abliteration.evaluation.capability import kept_share

if TYPE_CHECKING:
    from mlx_abliteration.evaluation.evaluate import EvalReport

    # Explicit: an implicit alias depends on mypy resolving EvalReport first within the import cycle.
    Report: TypeAlias = EvalReport | dict | None  # an evaluation report or its to_dict()

EVAL_COLUMNS = ("metric", "before", "after")


def _as_dict(report: Report) -> dict | None:
    if report is None or isinstance(report, dict):
        return report
    return report.to_dict()


def _count(report: dict | None, n: str, total: str) -> str:
    if not report or report.get(n) is None:
        return "-"
    return f"{report[n]}/{report[total]} ({report[n] / max(report[total], 1):.0%})"


def _capability(report: dict | None, before: dict | None) -> str:
    """Right answers; for the edited model also the share of the original's right answers it kept."""

    correct = report.get("capability_correct") if report else None
    if correct is None:
        return "-"
    cell = f"{sum(correct)}/{len(correct)}"
    kept = None if report is before or before is None else kept_share(before.get("capability_correct"), correct)
    if kept is not None and kept[1]:
        cell += f", kept {kept[0]}/{kept[1]} ({kept[0] / kept[1]:.0%})"
    return cell


def _kl(report: dict | None, key: str) -> str:
    return "-" if not report or report.get(key) is None else f"{report[key]:.4f}"


def _kl_label(*reports: dict | None) -> str:
    tokens = max((r.get("kl_tokens") or 1 for r in reports if r), default=1)
    return "KL vs original" if tokens == 1 else f"KL vs original ({tokens} tokens)"


def eval_rows(before: Report, after: Report, timing: bool = True) -> list[tuple[str, str, str]]:
    """(metric, before, after) cells: refusals on harmful and harmless prompts, KL, and (``timing``) speed."""
    before, after = _as_dict(before), _as_dict(after)
    rows = [
        ("refusals, harmful", lambda r: _count(r, "harmful_refusals", "harmful_total")),
        ("refusals, harmless", lambda r: _count(r, "harmless_refusals", "harmless_total")),
        (_kl_label(before, after), lambda r: _kl(r, "kl")),
    ]
    if any(r and r.get("kl_first_token") is not None for r in (before, after)):
        rows.append(("KL vs original (first token)", lambda r: _kl(r, "kl_first_token")))
    if any(r and r.get("judge") for r in (before, after)):
        rows = _judge_rows(rows)
    if any(r and (r.get("harmful_unfinished") or r.get("harmless_unfinished")) for r in (before, after)):
        rows += [
            ("still thinking at the token limit, harmful", lambda r: _count(r, "harmful_unfinished", "harmful_total")),
            (
                "still thinking at the token limit, harmless",
                lambda r: _count(r, "harmless_unfinished", "harmless_total"),
            ),
        ]
    if any(r and r.get("capability_correct") is not None for r in (before, after)):
        rows.append(("capability (exact answers)", lambda r: _capability(r, before)))
    if timing:
        rows += [
            ("tokens/s", lambda r: "-" if not r or r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"),
            ("seconds", lambda r: "-" if not r or r.get("seconds") is None else f"{r['seconds']:.1f}"),
        ]
    return [(name, cell(before), cell(after)) for name, cell in rows]


def _judge_rows(rows: list) -> list:
    """With a judge (``--judge MODEL``): keyword and judge counts side by side (the judge's with its
    undecided answers), their agreement, and the judge's measured precision/recall on held-out labels."""
    keywords = [(f"{name} (keywords)", cell) for name, cell in rows[:2]]
    return [
        keywords[0],
        ("refusals, harmful (judge)", lambda r: _judged(r, "harmful")),
        keywords[1],
        ("refusals, harmless (judge)", lambda r: _judged(r, "harmless")),
        ("judge agrees with keywords", lambda r: _count(r, "judge_agreed", "judge_compared")),
        ("judge precision / recall (held-out labels)", _judge_quality),
        *rows[2:],
    ]


def _judged(report: dict | None, kind: str) -> str:
    count = _count(report, f"{kind}_judge_refusals", f"{kind}_total")
    undecided = (report or {}).get(f"{kind}_judge_undecided")
    return f"{count} (+{undecided} undecided)" if undecided else count


def _judge_quality(report: dict | None) -> str:
    quality = (report or {}).get("judge_quality")
    if not quality:
        return "-"
    return f"{quality['precision']:.2f} / {quality['recall']:.2f} on {quality['labels']}"


def eval_text(before: Report, after: Report, headers: tuple[str, str] = ("before", "after")) -> str:
    """Plain-text table for the console; without ``before`` only the ``after`` column is shown."""
    rows: list[tuple[str, ...]] = [(name, b, a) for name, b, a in eval_rows(before, after)]
    if before is None:
        rows = [(name, a) for name, _, a in rows]
        head: tuple[str, ...] = ("", headers[1])
    else:
        head = ("", *headers)
    table = [head, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_markdown(before: Report, after: Report, headers: tuple[str, str] = ("original", "abliterated")) -> str:
    """Markdown table for the model card (no timing rows: they describe the machine, not the model)."""
    lines = [f"| | {headers[0]} | {headers[1]} |", "|---|---|---|"]
    lines += [f"| {name} | {b} | {a} |" for name, b, a in eval_rows(before, after, timing=False)]
    return "\n".join(lines) + "\n"


def layer_table(stats: list[dict], chosen: int | None, candidates: list[dict] | None = None) -> str:
    """Per-layer direction statistics (and, after ``--use-layer auto``, each candidate's scores)."""
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
