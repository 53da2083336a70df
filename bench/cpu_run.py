"""The whole `mlx-abliterate run` on the CPU, phase by phase (issue 17 items 5 and 6).

    python bench/cpu_run.py [--model DIR] [--quick]

Two runs of `run` with defaults on the real Qwen model (or ``--model``): the first
with ``--no-cache`` (the original model is evaluated), the second reusing the
cached evaluation. Each run's phases come from the stage events of its JSON log,
its peak RSS from /proc (VmHWM, polled) or getrusage. Results:
bench/results/cpu_run.json with wall time, phases, peak RSS and RSS / weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, machine, vm_hwm, write_result  # noqa: E402

# Stage messages of the pipeline (their first words) -> phase names.
PHASES = {
    "resolving": "resolve",
    "loading": "load",
    "finding the residual writers": "writers",
    "probing": "probe",
    "choosing the layer": "layer_choice",
    "evaluating the original": "eval_original",
    "evaluating the abliterated": "eval_abliterated",
    "saving": "save",
}


def phase_seconds(log_lines: list[str]) -> dict[str, float]:
    """Seconds from each stage event to the next (the last one ends at the final event)."""
    events = [json.loads(line) for line in log_lines if line.strip()]
    stamps = [(datetime.fromisoformat(e["time"]), e) for e in events]
    out: dict[str, float] = {}
    for (start, event), (end, _) in zip(stamps, stamps[1:]):
        if event.get("extra_info", {}).get("event") != "stage":
            continue
        name = next((v for k, v in PHASES.items() if event["message"].startswith(k)), event["message"][:40])
        out[name] = round(out.get(name, 0.0) + (end - start).total_seconds(), 2)
    return out


def _peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.5):
        hwm = vm_hwm(pid)
        if hwm is None:
            return
        peak[0] = max(peak[0], hwm)


def run_once(model: Path, out: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "run.jsonl"
        cmd = [sys.executable, "-m", "mlx_abliteration", "run", "-m", str(model), "-o", str(out), "--overwrite"]
        cmd += ["--log-file", str(log), "--quiet", *extra]
        started = time.perf_counter()
        child = subprocess.Popen(cmd)
        stop, peak = threading.Event(), [0]
        watcher = threading.Thread(target=_peak_rss, args=(child.pid, stop, peak), daemon=True)
        watcher.start()
        returncode = child.wait()
        wall = time.perf_counter() - started
        stop.set()
        watcher.join()
        rusage_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over all children
        phases = phase_seconds(log.read_text().splitlines()) if log.exists() else {}
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rss = peak[0] or rusage_peak
    return {
        "command": " ".join(cmd[2:]),
        "returncode": returncode,
        "wall_seconds": round(wall, 1),
        "phases_seconds": phases,
        "peak_rss_bytes": rss,
        "weights_bytes": weights,
        "peak_rss_over_weights": round(rss / weights, 2) if weights else None,
    }


def run(cache_dir: Path, quick: bool = False, model: Path | None = None) -> dict:
    from tests.support.real_models import ensure_model

    model = model or ensure_model("qwen", cache_dir)
    out = cache_dir / "bench" / "cpu-run-out"
    extra = ["--max-prompts", "32", "--eval-size", "16"] if quick else []
    result = {"machine": machine(), "model": str(model), "quick": quick}
    result["first_run"] = run_once(model, out, [*extra, "--no-cache"])
    result["second_run"] = run_once(model, out, extra)
    first, second = result["first_run"]["wall_seconds"], result["second_run"]["wall_seconds"]
    result["second_over_first"] = round(second / first, 3) if first else None
    write_result("cpu_run", result)
    return result


def report(result: dict) -> str:
    first, second = result["first_run"], result["second_run"]
    return (
        f"cpu run: first {first['wall_seconds'] / 60:.1f} min (peak RSS {first['peak_rss_over_weights']}x the weights), "
        f"second with the cached baseline {second['wall_seconds'] / 60:.1f} min"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--model", type=Path, help="model dir (default: the real Qwen model, converted once)")
    parser.add_argument("--quick", action="store_true", help="32 probe prompts, 16 held-out prompts")
    args = parser.parse_args()
    result = run(args.cache_dir, args.quick, args.model)
    print(report(result))
    return 0 if result["first_run"]["returncode"] == result["second_run"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
