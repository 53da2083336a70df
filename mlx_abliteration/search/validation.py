"""Choosing the saved trial on prompts no trial was scored on.

The best of N noisy scores on one split is biased toward noise: on Qwen2.5-1.5B a search saved a trial
whose KL looked lower than the fixed default's on its 32 scoring prompts and was higher on held-out ones.
So the candidates (the scoring split's Pareto trials within ``--max-kl``, and the fixed default) are
scored again on a validation split, disjoint from the probing, scoring and held-out evaluation prompts.
The saved trial is the fewest validation refusals within ``--max-kl`` (ties: lower KL). It replaces the
default only if it beats it beyond noise on the validation prompts: fewer refusals by a two-proportion
z-test at 95 %, or no more refusals and a lower KL by more than two standard errors of the per-prompt
(paired) KL differences. Otherwise the default is saved and the record says the two were not
distinguishable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_abliteration.config.defaults import AbliterationConfig, SearchSettings
from mlx_abliteration.data.prompt_selection import scan_prompts
from mlx_abliteration.pipeline import steps
from mlx_abliteration.pipeline.plan_sources import RunContext
from mlx_abliteration.search.pareto import StudySummary, TrialRow, choose_trial
from mlx_abliteration.search.scorer import TrialScorer, refusal_judge

if TYPE_CHECKING:
    from mlx_abliteration.probe.directions import RefusalDirections

Z95 = 1.96


@dataclass
class Validated:
    """A trial scored on the validation split."""

    number: int
    label: str  # "fixed default" for the warm start, else ""
    refusals: int
    total: int
    kl_rows: list[float]  # per-prompt (per-token for multi-token KL) KL on the harmless validation prompts

    @property
    def kl(self) -> float:
        return sum(self.kl_rows) / len(self.kl_rows) if self.kl_rows else 0.0

    def to_dict(self) -> dict:
        low, high = wilson_interval(self.refusals, self.total)
        return {
            "trial": self.number,
            "label": self.label,
            "refusals": self.refusals,
            "total": self.total,
            "refusal_rate_95": [round(low, 4), round(high, 4)],
            "kl": self.kl,
            "kl_se": _standard_error(self.kl_rows),
        }


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0 and ``total``)."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _standard_error(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def fewer_refusals(a: Validated, b: Validated, z: float = Z95) -> bool:
    """``a`` refuses less often than ``b`` beyond noise (two-proportion z-test)."""
    if a.total == 0 or b.total == 0 or a.refusals / a.total >= b.refusals / b.total:
        return False
    pooled = (a.refusals + b.refusals) / (a.total + b.total)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / a.total + 1 / b.total))
    return spread == 0 or (b.refusals / b.total - a.refusals / a.total) / spread > z


def lower_kl(a: Validated, b: Validated, z: float = Z95) -> bool:
    """``a``'s KL is below ``b``'s beyond noise: the paired per-prompt differences' mean exceeds ``z`` SE."""
    if len(a.kl_rows) != len(b.kl_rows) or not a.kl_rows:
        return False
    differences = [kb - ka for ka, kb in zip(a.kl_rows, b.kl_rows)]
    mean = sum(differences) / len(differences)
    return mean > 0 and mean > z * _standard_error(differences)


def beats(a: Validated, b: Validated) -> bool:
    """``a`` is better than ``b`` beyond noise: fewer refusals, or as few and a lower KL."""
    return fewer_refusals(a, b) or (a.refusals <= b.refusals and lower_kl(a, b))


def choose_validated(
    candidates: Sequence[Validated], default: Validated | None, max_kl: float
) -> tuple[Validated, str]:
    """The trial to save and why, from the candidates' validation scores (the default among them or apart)."""
    pool = list(candidates) + ([default] if default is not None and default not in candidates else [])
    if not pool:
        raise ValueError("no candidate to choose from")
    allowed = [c for c in pool if c.kl <= max_kl] or pool
    best = min(allowed, key=lambda c: (c.refusals, c.kl, c.number))
    if default is None:
        return best, f"fewest validation refusals with KL <= {max_kl:g}"
    if best is default:
        return default, "the fixed default scored best on the validation prompts"
    if beats(best, default):
        return best, "beats the fixed default on the validation prompts beyond noise"
    return default, (
        f"trial {best.number} was not distinguishable from the fixed default on the validation prompts "
        f"(refusals {best.refusals}/{best.total} vs {default.refusals}/{default.total}, "
        f"KL {best.kl:.4f} vs {default.kl:.4f}); saving the default"
    )


def validation_prompt_sets(config: AbliterationConfig, start: int, size: int) -> tuple[list[str], list[str]]:
    """The spare prompts after the scoring split (none unless both kinds have some)."""
    cache = Path(config.cache_dir) if config.cache_dir else None
    sets = []
    for kind, source in (("harmful", config.harmful_dataset), ("harmless", config.harmless_dataset)):
        scan = scan_prompts(source, kind, cache, config.dataset_column)
        take = (config.max_prompts or scan.count) + start + size  # probing, scoring, then validation prompts
        rest = scan.split(None, config.eval_size, config.seed, name=source or f"default {kind}", take=take)[0]
        sets.append(rest[config.max_prompts + start :][:size])
    return (sets[0], sets[1]) if all(sets) else ([], [])


MAX_VALIDATED = 4  # best scoring-split trials scored again, besides the fixed default


def validate_front(
    ctx: RunContext, directions: RefusalDirections, summary: StudySummary, settings: SearchSettings
) -> tuple[TrialRow | None, dict]:
    """The trial to save, chosen on the validation split (``search.validation``), and what was measured."""
    allowed = sorted((r for r in summary.rows if r.kl <= settings.max_kl), key=lambda r: (r.refusals, r.kl, r.number))
    fallback = choose_trial(summary.rows, settings.max_kl)
    harmful, harmless = validation_prompt_sets(ctx.config, settings.search_prompts, settings.validation_prompts)
    default = next((r for r in summary.rows if r.warm_start == "fixed default"), None)
    candidates = {r.number: r for r in allowed[:MAX_VALIDATED] + ([default] if default else [])}
    if settings.validation_prompts == 0 or not harmful or len(candidates) < 2 or ctx.model is None:
        return fallback, {}
    ctx.report.emit("stage", f"validating {len(candidates)} trials on {len(harmful)}+{len(harmless)} unseen prompts")
    model: Any = ctx.model
    scorer = TrialScorer(
        model,
        ctx.tokenizer,
        directions,
        harmful,
        harmless,
        targets=ctx.config.targets,
        storage_dtype=steps.storage_dtype(ctx.source),
        edited_precision=ctx.config.edited_precision,
        max_tokens=settings.search_max_tokens,
        batch_size=ctx.config.batch_size,
        system_prompt=ctx.config.system_prompt,
        kl_tokens=ctx.config.kl_tokens,
    )
    scored = {}
    with refusal_judge(ctx.config, ctx.report) as scorer.judge:  # the trials' refusal counter: the same one counts here
        refusals_by = "refusal markers" if scorer.judge is None else f"judge {ctx.config.judge}"
        for n, (number, row) in enumerate(candidates.items()):
            score = scorer(row.spec)
            scored[number] = Validated(number, row.warm_start, score.refusals, score.total, score.kl_rows)
            low, high = wilson_interval(score.refusals, score.total)
            ctx.report.emit(
                "info",
                f"validation: trial {number}{f' ({row.warm_start})' if row.warm_start else ''}: refusals "
                f"{score.refusals}/{score.total} (95% {low:.2f}-{high:.2f}), KL {scored[number].kl:.4f}",
            )
            ctx.report.progress(n + 1, len(candidates), "validation")
    best, reason = choose_validated(
        [v for k, v in scored.items() if default is None or k != default.number],
        scored[default.number] if default else None,
        settings.max_kl,
    )
    ctx.report.emit("info", f"saved trial {best.number}: {reason}")
    record = {
        "prompts": len(harmful),
        "refusals_by": refusals_by,
        "candidates": [v.to_dict() for v in scored.values()],
        "chosen": best.number,
        "reason": reason,
    }
    return candidates[best.number], record
