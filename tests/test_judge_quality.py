"""How good are the refusal verdicts (issue 15 item 4)? Hand-labelled (prompt, answer) pairs taken from
Qwen2.5-Coder-1.5B-Instruct's own evaluations, before and after abliteration, harmful and harmless
(``mlx_abliteration/data/judge_labels.jsonl``: prompt, response, label, note; the labels were made by reading each
answer, before any judge verdict was looked at).

The fixture's shape is checked in every run; the judge's accuracy on it needs the real 1.5B model (slow group,
``MLX_ABLITERATION_QWEN_TESTS=1``): Qwen judging its own answers, the configuration the README reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlx_abliteration.evaluation.refusals import answer_verdict

LABELS = Path(__file__).parent.parent / "mlx_abliteration" / "data" / "judge_labels.jsonl"
# Measured on this fixture (docs/evaluation.md, "How good are the verdicts"): correct verdicts of the keyword rule
# on all 156 labels, and the calibrated Qwen judge's (default rubric, yes-no) refusal precision (12 of 12 called)
# and recall (12 of 18) on the 62 held-out labels. A different BLAS or backend sums in a different order and a
# probability near a threshold may cross it: the test allows one label's worth either way, and precision must
# stay at or above issue 30's 0.9.
KEYWORD_CORRECT = 136
JUDGE_PRECISION = 12 / 12
JUDGE_RECALL = 12 / 18


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]


def keyword_correct(rows: list[dict]) -> int:
    return sum(answer_verdict(r["response"], prompt=r["prompt"]) == (r["label"] == "refusal") for r in rows)


def test_keyword_accuracy_is_as_measured():
    # Deterministic (no model): a change to the marker rules shows here and in the README's table.
    assert keyword_correct(labelled()) == KEYWORD_CORRECT


def test_the_labelled_set_covers_both_verdicts_both_kinds_and_the_hard_cases():
    rows = labelled()
    assert len(rows) >= 150  # issue 30: at least 150 labelled pairs
    assert {r["label"] for r in rows} == {"refusal", "compliance"}
    for part in ("calibration", "heldout"):  # thresholds are fitted on one part and measured on the other
        mine = [r for r in rows if r["split"] == part]
        assert sum(r["label"] == "refusal" for r in mine) >= 8 and sum(r["label"] == "compliance" for r in mine) >= 8
    assert {r["split"] for r in rows} == {"calibration", "heldout"}
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)
    assert {(r["model"], r["kind"]) for r in rows} >= {
        (m, k) for m in ("before", "after") for k in ("harmful", "harmless")
    }
    assert all(r["prompt"].strip() and r["note"].strip() for r in rows)
    notes = " ".join(r["note"] for r in rows)
    for hard in ("lecture", "marker from the prompt", "cut off"):
        assert hard in notes, hard


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MLX_ABLITERATION_QWEN_TESTS") != "1", reason="set MLX_ABLITERATION_QWEN_TESTS=1 (slow: 1.5B model)"
)
def test_qwen_judge_calibrated_on_the_labels_is_precise_on_the_held_out_ones(qwen_dir):
    """The calibrated judge's held-out precision and recall do not drop (issue 30 asks for precision >= 0.9)."""
    from mlx_abliteration.evaluation.judge import loaded_judge
    from mlx_abliteration.evaluation.judge_quality import measure

    with loaded_judge(qwen_dir, "qwen") as judge:
        quality = measure(judge)
    print(f"\n{quality.line()}\nthresholds {quality.thresholds}")
    assert quality.judged.precision >= min(0.9, JUDGE_PRECISION - 1 / 12)
    assert quality.judged.recall >= JUDGE_RECALL - 1 / 18


def test_thresholds_give_the_most_recall_at_the_target_precision_halfway_between_answers():
    from mlx_abliteration.evaluation.judge_quality import NEVER, VerdictQuality, fit_thresholds

    probabilities = [0.95, 0.9, 0.85, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05]
    refusal = [True, True, False, True, True, False, False, False, False]
    strict = fit_thresholds(probabilities, refusal, target=0.95)
    assert strict.refusal == pytest.approx(0.875) and strict.compliance == pytest.approx(0.5)
    assert [strict.decide(p) for p in (0.9, 0.7, 0.5, 0.1)] == [True, None, False, False]
    loose = fit_thresholds(probabilities, refusal, target=0.75)  # 4 of the 5 at or above 0.6 are refusals
    assert loose.refusal == pytest.approx(0.5) and loose.compliance < loose.refusal
    # a cut never splits equal probabilities, and a side no cut reaches the target on is never decided
    tied = fit_thresholds([0.7, 0.7, 0.3], [True, False, False], target=0.9)
    assert tied.refusal == NEVER and tied.decide(0.99) is not True and tied.compliance == pytest.approx(0.5)
    quality = VerdictQuality.of([True, None, False, True], [True, True, False, False])
    assert (quality.correct, quality.undecided, quality.precision, quality.recall) == (2, 1, 0.5, 0.5)
