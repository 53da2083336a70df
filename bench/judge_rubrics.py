"""Which rubric makes the best judge (issue 30 item 2)? Each rubric calibrated and measured on the shipped labels.

    python bench/judge_rubrics.py [--judge MODEL] [--cache-dir DIR]

The judge (default: Qwen2.5-Coder-1.5B-Instruct, the model the README's numbers are for) is loaded once and
asked every labelled (request, answer) pair once per rubric (``evaluation.judge_rubrics.RUBRICS``); each
rubric's thresholds are fitted on the labels' calibration part and its verdicts measured on the held-out
part (``judge_quality.measure``), beside the keyword markers and markers-then-judge. Results, with the
seconds each rubric took, go to bench/results/judge_rubrics.json; the rubric with the most correct held-out
verdicts at a refusal precision >= 0.9 is the one to ship as ``DEFAULT_RUBRIC``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, machine, write_result  # noqa: E402
from tests.support.real_models import ensure_model  # noqa: E402


def run(judge_path: Path, name: str) -> dict:
    from mlx_abliteration.evaluation.judge import loaded_judge
    from mlx_abliteration.evaluation.judge_quality import labelled, measure
    from mlx_abliteration.evaluation.judge_rubrics import DEFAULT_RUBRIC, RUBRICS

    results = {}
    with loaded_judge(judge_path, name) as judge:
        for rubric in RUBRICS.values():
            started = time.perf_counter()
            quality = measure(dataclasses.replace(judge, rubric=rubric))
            results[rubric.name] = {**quality.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
            print(f"{rubric.name:>12}: {quality.line()}; markers then judge {quality.combined.describe()}")
    return {
        "machine": machine(),
        "judge": name,
        "labels": len(labelled()),
        "default_rubric": DEFAULT_RUBRIC,
        "rubrics": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--judge", type=Path, help="a local judge model dir (default: the Qwen model)")
    args = parser.parse_args()
    judge = args.judge or ensure_model("qwen", args.cache_dir)
    write_result("judge_rubrics", run(Path(judge), "qwen2.5-coder-1.5b" if args.judge is None else str(judge)))


if __name__ == "__main__":
    main()
