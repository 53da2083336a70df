"""How good is a judge? Its verdicts on the shipped hand-labelled answers, beside the keyword markers'.

``data/judge_labels.jsonl`` holds (prompt, answer) pairs from Qwen2.5-Coder-1.5B-Instruct's own
evaluations before and after abliteration, harmful and harmless, each labelled refusal or compliance by
reading the answer before any verdict was seen. ``eval --judge-calibrate MODEL`` judges them once per
judge (cached under ``<cache dir>/judges/``, keyed by the judge's files, the rubric and the labels); every
later ``--judge MODEL`` says in one line how that judge measured, and whether the markers did better.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_abliteration.evaluation.judge import JUDGE_BATCH_SIZE, Progress, judge_identity, loaded_judge
from mlx_abliteration.evaluation.refusals import answer_verdict
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent
from mlx_abliteration.runtime.utils import cache_root

LABELS = Path(__file__).resolve().parent.parent / "data" / "judge_labels.jsonl"


@dataclass
class VerdictQuality:
    """Verdicts against the labels, refusal as the positive class (an unanswered verdict counts as wrong)."""

    correct: int
    total: int
    precision: float  # of the refusals called, the share that are refusals
    recall: float  # of the labelled refusals, the share called refusals

    @classmethod
    def of(cls, called: list[bool | None], truth: list[bool]) -> VerdictQuality:
        hits = sum(c is True and t for c, t in zip(called, truth))
        said = sum(c is True for c in called)
        return cls(
            correct=sum(c == t for c, t in zip(called, truth)),
            total=len(truth),
            precision=hits / said if said else 0.0,
            recall=hits / sum(truth) if any(truth) else 0.0,
        )

    def describe(self) -> str:
        return f"{self.correct}/{self.total} correct (refusal precision {self.precision:.2f}, recall {self.recall:.2f})"


@dataclass
class JudgeQuality:
    judge: str
    judged: VerdictQuality
    keywords: VerdictQuality

    @property
    def beats_keywords(self) -> bool:
        return self.judged.correct > self.keywords.correct

    def line(self) -> str:
        verdict = "" if self.beats_keywords else "; it is no more accurate than the keyword markers"
        return (
            f"judge {self.judge} on {self.judged.total} hand-labelled answers: {self.judged.describe()}, "
            f"keyword markers {self.keywords.describe()}{verdict}"
        )

    def to_dict(self) -> dict:
        return {"judge": self.judge, "judged": asdict(self.judged), "keywords": asdict(self.keywords)}

    @classmethod
    def from_dict(cls, data: dict) -> JudgeQuality:
        return cls(str(data["judge"]), VerdictQuality(**data["judged"]), VerdictQuality(**data["keywords"]))


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _quality_path(path: Path, cache_dir: str | Path | None) -> Path:
    identity = {"judge": judge_identity(path), "labels": hashlib.sha256(LABELS.read_bytes()).hexdigest()}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / "judges" / f"{Path(path).name}-{key}.json"


def measured_quality(path: Path, name: str, cache_dir: str | Path | None = None) -> JudgeQuality | None:
    """The judge's measured quality if ``eval --judge-calibrate`` stored it (None if not, or unreadable)."""
    file = _quality_path(path, cache_dir)
    try:
        return JudgeQuality.from_dict({**json.loads(file.read_text(encoding="utf-8")), "judge": name})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quality_line(path: Path, name: str, cache_dir: str | Path | None = None) -> str:
    """One line on how good the judge is, or how to find out."""
    quality = measured_quality(path, name, cache_dir)
    if quality is not None:
        return quality.line()
    return f"judge {name}: accuracy not measured; `mlx-abliterate eval --judge-calibrate {name}` measures it"


def calibrate_judge(
    path: Path,
    name: str,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch_size: int = JUDGE_BATCH_SIZE,
    progress: Progress | None = None,
) -> JudgeQuality:
    """The judge's verdicts on the shipped labels beside the markers' (stored for later ``--judge`` runs)."""
    if use_cache and (known := measured_quality(path, name, cache_dir)) is not None:
        return known
    rows = labelled()
    truth = [r["label"] == "refusal" for r in rows]
    with loaded_judge(path, name, batch_size) as judge:
        verdicts = judge.verdicts([(r["prompt"], r["response"]) for r in rows], progress)
    keyword_calls: list[bool | None] = [answer_verdict(r["response"], prompt=r["prompt"]) for r in rows]
    quality = JudgeQuality(
        name, VerdictQuality.of([v.refusal for v in verdicts], truth), VerdictQuality.of(keyword_calls, truth)
    )
    file = _quality_path(path, cache_dir)
    ensure_parent(file)
    with atomic_path(file, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(quality.to_dict(), indent=2), encoding="utf-8")
    return quality


def quality_record(quality: JudgeQuality) -> dict[str, Any]:
    return {"labels": str(LABELS.name), **quality.to_dict(), "beats_keywords": quality.beats_keywords}
