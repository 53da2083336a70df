"""A repeated identical ``eval --judge`` vs the first one (issue 30 item 4: target <= 0.6x).

    python bench/eval_twice.py [--cache-dir DIR] [--num-prompts 32] [--max-tokens 64] [--judge MODEL]

Evaluates an abliterated Qwen2.5-Coder-1.5B (``make demo``'s output, or a fresh ``run`` into a temp dir)
against the original, twice, with the same settings and a fresh evaluation cache; the judge is the
original model unless ``--judge`` names another. Both runs' wall times and their ratio go to
bench/results/eval_twice.json; the two reports must be equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, REPO, machine, write_result  # noqa: E402
from tests.support.real_models import ensure_model  # noqa: E402


def _cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlx_abliteration", *args], cwd=REPO, check=True)
    return time.perf_counter() - started


def run(cache: Path, num_prompts: int, max_tokens: int, judge: str | None) -> dict:
    qwen = ensure_model("qwen", cache)
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        abliterated = REPO / "outputs" / "qwen2.5-coder-1.5b-abliterated"
        if not (abliterated / "abliteration_log.json").is_file():
            abliterated = scratch_dir / "abliterated"
            _cli("run", "-m", str(qwen), "-o", str(abliterated), "--no-eval", "--cache-dir", str(cache), "--quiet")
        common = ["eval", "-m", str(abliterated), "--baseline", str(qwen), "--judge", judge or str(qwen)]
        common += ["--num-prompts", str(num_prompts), "--max-tokens", str(max_tokens)]
        common += ["--cache-dir", str(scratch_dir / "eval-cache"), "--quiet"]
        seconds = [_cli(*common, "--output", str(scratch_dir / f"{n}.json")) for n in ("first", "second")]
        reports = [json.loads((scratch_dir / f"{n}.json").read_text())["report"] for n in ("first", "second")]
    return {
        "machine": machine(),
        "settings": {"num_prompts": num_prompts, "max_tokens": max_tokens, "judge": judge or "the original model"},
        "first_seconds": round(seconds[0], 1),
        "second_seconds": round(seconds[1], 1),
        "ratio": round(seconds[1] / seconds[0], 3),
        "same_report": reports[0] == reports[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--judge", default=None, help="judge model (default: the original Qwen)")
    args = parser.parse_args()
    result = run(args.cache_dir, args.num_prompts, args.max_tokens, args.judge)
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('eval_twice', result)}")


if __name__ == "__main__":
    main()
