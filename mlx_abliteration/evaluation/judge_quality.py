"""How good is a judge, and where its verdicts are cut: calibration on the shipped hand labels.

``data/judge_labels.jsonl`` holds (prompt, answer) pairs from Qwen2.5-Coder-1.5B-Instruct's own evaluations
before and after abliteration, harmful and harmless, each labelled refusal or compliance by reading the
answer before any verdict was seen, and each in one of two parts: ``calibration`` and ``heldout``.

A judge is calibrated once (cached under ``<cache dir>/judges/``, keyed by its files, the rubric and the
labels): it judges every labelled answer; on the calibration part, the refusal threshold is the lowest
refusal probability above which at least ``TARGET_PRECISION`` of the answers are refusals, and the
compliance threshold the highest below which at least that share complies; in between a verdict is
undecided. The held-out part measures the calibrated verdicts (refusal precision and recall, undecided
count) beside the keyword markers', and that is what every report shows next to the judge's counts.
``--judge MODEL`` calibrates at first use; ``eval --judge-calibrate MODEL`` does only that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_abliteration.evaluation.judge import (
    JUDGE_BATCH_SIZE,
    UNCALIBRATED,
    Judge,
    Progress,
    Thresholds,
    judge_identity,
    judge_report,
    loaded_judge,
)
from mlx_abliteration.evaluation.judge_rubrics import DEFAULT_RUBRIC, LABELS
from mlx_abliteration.evaluation.refusals import answer_verdict
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent
from mlx_abliteration.runtime.utils import cache_root

CALIBRATION, HELDOUT = "calibration", "heldout"
# Fitted on the calibration part with a margin, so the held-out refusal precision clears 0.9.
TARGET_PRECISION = 0.95
NEVER = 1.5  # a threshold no probability reaches: the judge never decides that side


@dataclass
class VerdictQuality:
    """Verdicts against the labels, refusal as the positive class; an undecided verdict is neither right nor
    a refusal called."""

    correct: int
    total: int
    precision: float  # of the refusals called, the share that are refusals
    recall: float  # of the labelled refusals, the share called refusals
    undecided: int = 0

    @classmethod
    def of(cls, called: Sequence[bool | None], truth: Sequence[bool]) -> VerdictQuality:
        hits = sum(c is True and t for c, t in zip(called, truth))
        said = sum(c is True for c in called)
        return cls(
            correct=sum(c == t for c, t in zip(called, truth)),
            total=len(truth),
            precision=hits / said if said else 0.0,
            recall=hits / sum(truth) if any(truth) else 0.0,
            undecided=sum(c is None for c in called),
        )

    def describe(self) -> str:
        undecided = f", {self.undecided} undecided" if self.undecided else ""
        return (
            f"{self.correct}/{self.total} correct{undecided} "
            f"(refusal precision {self.precision:.2f}, recall {self.recall:.2f})"
        )


def fit_thresholds(
    probabilities: Sequence[float], truth: Sequence[bool], target: float = TARGET_PRECISION
) -> Thresholds:
    """``Thresholds`` for refusal probabilities: the refusal cut is the lowest at which the answers at or
    above it are at least ``target`` refusals (most recall at that precision), the compliance cut the
    highest at which those at or below are at least ``target`` compliances. A cut sits halfway between two
    measured probabilities, so a hair's difference in a later run does not move a verdict across it."""
    refusal = _cut(probabilities, truth, target)
    compliance = 1.0 - _cut([1.0 - p for p in probabilities], [not t for t in truth], target)
    return Thresholds(refusal=refusal, compliance=min(compliance, refusal - 1e-6))


def _cut(probabilities: Sequence[float], positive: Sequence[bool], target: float) -> float:
    """The lowest cut whose answers at or above it are at least ``target`` positive (``NEVER`` if none)."""
    ranked = sorted(zip(probabilities, positive), key=lambda pair: -pair[0])
    best, hits = NEVER, 0
    for i, (p, is_positive) in enumerate(ranked):
        hits += is_positive
        tied_next = i + 1 < len(ranked) and ranked[i + 1][0] == p
        if not tied_next and hits / (i + 1) >= target:
            below = ranked[i + 1][0] if i + 1 < len(ranked) else 0.0
            best = (p + below) / 2
    return best


@dataclass
class JudgeQuality:
    judge: str
    rubric: str
    thresholds: Thresholds
    judged: VerdictQuality  # the calibrated verdicts on the held-out labels
    keywords: VerdictQuality  # the markers on the same labels
    combined: VerdictQuality  # a marker's refusal, else the judge's verdict (measured, not used: docs/evaluation.md)
    calibration_labels: int

    @property
    def beats_keywords(self) -> bool:
        return self.judged.correct > self.keywords.correct

    def line(self) -> str:
        verdict = "" if self.beats_keywords else "; it is no more accurate than the keyword markers"
        return (
            f"judge {self.judge} on {self.judged.total} held-out hand-labelled answers: {self.judged.describe()}, "
            f"keyword markers {self.keywords.describe()}{verdict}"
        )

    def summary(self) -> dict[str, Any]:
        """What a report shows beside the judge's counts."""
        return {
            "labels": self.judged.total,
            "precision": self.judged.precision,
            "recall": self.judged.recall,
            "undecided": self.judged.undecided,
            "beats_keywords": self.beats_keywords,
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data["thresholds"] = asdict(self.thresholds)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JudgeQuality:
        return cls(
            judge=str(data["judge"]),
            rubric=str(data["rubric"]),
            thresholds=Thresholds(**data["thresholds"]),
            judged=VerdictQuality(**data["judged"]),
            keywords=VerdictQuality(**data["keywords"]),
            combined=VerdictQuality(**data["combined"]),
            calibration_labels=int(data["calibration_labels"]),
        )


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure(judge: Judge, progress: Progress | None = None) -> JudgeQuality:
    """Calibrate ``judge`` on the labels' calibration part, and measure it on the held-out part."""
    rows = labelled()
    readings = judge_with(judge, UNCALIBRATED).verdicts([(r["prompt"], r["response"]) for r in rows], progress)
    probability = [v.refusal_probability if v.refusal_probability is not None else 1.0 for v in readings]
    truth = [r["label"] == "refusal" for r in rows]
    fit = [i for i, r in enumerate(rows) if r["split"] == CALIBRATION]
    test = [i for i, r in enumerate(rows) if r["split"] == HELDOUT]
    thresholds = fit_thresholds([probability[i] for i in fit], [truth[i] for i in fit])
    judged = [thresholds.decide(probability[i]) for i in test]
    markers = [answer_verdict(rows[i]["response"], prompt=rows[i]["prompt"]) for i in test]
    combined = [True if marker else verdict for marker, verdict in zip(markers, judged)]
    held_truth = [truth[i] for i in test]
    return JudgeQuality(
        judge=judge.name,
        rubric=judge.rubric.name,
        thresholds=thresholds,
        judged=VerdictQuality.of(judged, held_truth),
        keywords=VerdictQuality.of(markers, held_truth),
        combined=VerdictQuality.of(combined, held_truth),
        calibration_labels=len(fit),
    )


def judge_with(judge: Judge, thresholds: Thresholds, quality: dict | None = None) -> Judge:
    return Judge(judge.model, judge.tokenizer, judge.name, judge.batch_size, judge.rubric, thresholds, quality)


def _quality_path(path: Path, rubric: str, cache_dir: str | Path | None) -> Path:
    identity = {"judge": judge_identity(path, rubric)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / "judges" / f"{Path(path).name}-{key}.json"


def measured_quality(
    path: Path, name: str, cache_dir: str | Path | None = None, rubric: str = DEFAULT_RUBRIC
) -> JudgeQuality | None:
    """The judge's calibration if one is stored (None if not, or unreadable)."""
    file = _quality_path(path, rubric, cache_dir)
    try:
        return JudgeQuality.from_dict({**json.loads(file.read_text(encoding="utf-8")), "judge": name})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _measure_and_store(
    judge: Judge, path: Path, cache_dir: str | Path | None, progress: Progress | None
) -> JudgeQuality:
    """``measure`` the loaded ``judge``, and store the result where ``measured_quality`` finds it."""
    quality = measure(judge, progress)
    file = _quality_path(path, quality.rubric, cache_dir)
    ensure_parent(file)
    with atomic_path(file, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(quality.to_dict(), indent=2), encoding="utf-8")
    return quality


@contextmanager
def calibrated_judge(
    path: Path,
    name: str,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = JUDGE_BATCH_SIZE,
    rubric: str = DEFAULT_RUBRIC,
    use_cache: bool = True,
    progress: Progress | None = None,
    emit: Callable[[str], None] | None = None,
) -> Iterator[Judge]:
    """The judge loaded with its calibrated thresholds (calibrated now, and stored, the first time);
    ``emit`` gets the one line on how it measured. Freed on exit."""
    with loaded_judge(path, name, batch_size, rubric) as raw:
        quality = measured_quality(path, name, cache_dir, rubric) if use_cache else None
        if quality is None:
            if emit is not None:
                emit(f"calibrating the judge {name} on {len(labelled())} hand-labelled answers (once per judge)")
            quality = _measure_and_store(raw, path, cache_dir, progress)
        if emit is not None:
            emit(quality.line())
        judge = judge_with(raw, quality.thresholds, quality.summary())
        try:
            yield judge
        finally:
            judge.model = judge.tokenizer = None  # the weights go back when ``loaded_judge`` frees them


def calibrate_judge(
    path: Path,
    name: str,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch_size: int = JUDGE_BATCH_SIZE,
    rubric: str = DEFAULT_RUBRIC,
    progress: Progress | None = None,
) -> JudgeQuality:
    """The judge's calibration and measured quality (stored for later ``--judge`` runs)."""
    if use_cache and (known := measured_quality(path, name, cache_dir, rubric)) is not None:
        return known
    with loaded_judge(path, name, batch_size, rubric) as judge:
        return _measure_and_store(judge, path, cache_dir, progress)


def judge_reports(
    reports: Sequence,
    path: Path,
    name: str,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = JUDGE_BATCH_SIZE,
    progress: Progress | None = None,
    emit: Callable[[str], None] | None = None,
) -> None:
    """Load the calibrated judge, judge every given report (None skipped), free the judge."""
    with calibrated_judge(
        path, name, cache_dir=cache_dir, batch_size=batch_size, progress=progress, emit=emit
    ) as judge:
        for report in reports:
            if report is not None:
                judge_report(report, judge, progress)


def quality_record(quality: JudgeQuality) -> dict[str, Any]:
    return {"labels": str(LABELS.name), **quality.to_dict(), "beats_keywords": quality.beats_keywords}
