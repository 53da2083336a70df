"""Run the CPU benchmarks (``make bench``) and print one summary.

    python bench/run_all.py [--cache-dir DIR] [--quick] [--only probe,save,streamed]

1. probe_vs_torch  probe throughput vs transformers + PyTorch (fp32, bf16)
2. ablate_save     rewrite a 3 GB sharded model vs copying it; peak RSS vs a shard
3. streamed_probe  probe a model larger than a memory cgroup's cap
4. cpu_run         the whole `run` on Qwen, phase by phase, first and second run, peak RSS / weights
Results: bench/results/<name>.json, and bench/results/summary.json: every
result's summary in one file (with the GPU runs' JSON found there). The GPU
benchmark runs on an NVIDIA machine (bench/gpu_probe_ablate.py,
bench/gpu_run.sh); see bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ablate_save, cpu_run, probe_vs_torch, streamed_probe  # noqa: E402
from bench._common import DEFAULT_CACHE, RESULTS  # noqa: E402


def _probe(cache: Path, quick: bool) -> str:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return "probe_vs_torch skipped: install the bench extra (pip install -e .[bench])"
    return probe_vs_torch.report(probe_vs_torch.run(cache, prompts=16 if quick else 80))


def _save(cache: Path, quick: bool) -> str:
    return ablate_save.report(ablate_save.run(cache, repeats=1 if quick else 2))


def _streamed(cache: Path, quick: bool) -> str:
    return streamed_probe.report(streamed_probe.run(cache, prompts=8 if quick else 12))


def _cpu_run(cache: Path, quick: bool) -> str:
    return cpu_run.report(cpu_run.run(cache, quick))


BENCHMARKS = {"probe": _probe, "save": _save, "streamed": _streamed, "cpu_run": _cpu_run}


def write_summary() -> Path:
    """One JSON with every result file's summary (the whole result where it has none)."""
    summary = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path.name == "summary.json":
            continue
        result = json.loads(path.read_text())
        summary[path.stem] = result.get("summary", result) if isinstance(result, dict) else result
    out = RESULTS / "summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args()
    lines, failed = [], False
    for name in args.only.split(","):
        started = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            line = BENCHMARKS[name.strip()](args.cache_dir, args.quick)
        except Exception as err:  # report the others even if one fails
            line, failed = f"{name} FAILED: {type(err).__name__}: {err}", True
        lines.append(f"{line}  [{time.perf_counter() - started:.0f} s]")
        print(lines[-1], flush=True)
    print("\n== summary (JSON in " + str(write_summary()) + ")")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
