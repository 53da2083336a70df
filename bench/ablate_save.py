"""Ablate + save a multi-GB sharded model vs copying its files; peak memory vs the largest shard.

    python bench/ablate_save.py [--cache-dir DIR] [--repeats 2]

Builds (once, cached) a random-weight bf16 Llama of about 3.3 GB in 8
shards. Every shard holds residual writers, so every shard is rewritten.
Each measurement runs in a fresh process, alternating copy and save, and the
process reports its own peak RSS. Both include ``os.sync()`` so the disk
writes are counted, not just the page cache.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, gib, machine, run_child, write_result  # noqa: E402

SHAPE = dict(hidden_size=2048, num_layers=24, intermediate_size=8192, vocab_size=32000, num_heads=16, num_kv_heads=8)
NUM_SHARDS = 8

SAVE = """
import json, os, sys, time
import mlx_abliteration
import mlx.core as mx
from bench._common import peak_rss
from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.io.model_io import read_config
src, out = sys.argv[1:3]
config = read_config(src)
mx.random.seed(1)
plan = uniform_plan(mx.random.normal((config["hidden_size"],)), config["num_hidden_layers"])
mx.eval(plan.layer_directions)
start_rss = peak_rss()
marks = []
started = time.perf_counter()
summary = save_ablated_model(src, out, plan, progress=lambda d, t, w: marks.append(time.perf_counter()))
os.sync()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "shards_seconds": marks[-1] - started, "edited_modules": len(summary["reports"]),
                  "peak_rss_bytes": peak_rss(), "start_rss_bytes": start_rss}))
"""

COPY = """
import json, os, shutil, sys, time
from bench._common import peak_rss
src, out = sys.argv[1:3]
started = time.perf_counter()
shutil.copytree(src, out)
os.sync()
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss()}))
"""

IMPORT_ONLY = """
import json
import mlx_abliteration
import mlx.core as mx
from mlx_abliteration.io import model_io
from mlx_abliteration.edit import orthogonalize as ablate
from bench._common import peak_rss
mx.eval(mx.zeros((4,)))
print(json.dumps({"peak_rss_bytes": peak_rss()}))
"""


def ensure_model(cache_dir: Path) -> Path:
    from tests.support.tiny_models import build_synthetic_model, llama_config

    path = cache_dir / "bench" / "synthetic-llama-3g-bf16"
    if not (path / "config.json").exists():
        print(f"building {path} ...", flush=True)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build_synthetic_model(tmp, llama_config(**SHAPE), num_shards=NUM_SHARDS)
        tmp.rename(path)
    return path


def measure(model: Path, work: Path, repeats: int) -> dict:
    copies, saves = [], []
    for _ in range(repeats):
        for kind, code, runs in (("copy", COPY, copies), ("save", SAVE, saves)):
            out = work / kind
            shutil.rmtree(out, ignore_errors=True)
            result = run_child(code, str(model), str(out))
            if result["returncode"] != 0:
                raise RuntimeError(f"{kind} failed: {result.get('stderr_tail')}")
            runs.append(result)
            shutil.rmtree(out, ignore_errors=True)
    return {"copy": copies, "save": saves}


def summarize(model: Path, runs: dict, baseline_rss: int) -> dict:
    shards = sorted(model.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    copy_s = statistics.median(r["seconds"] for r in runs["copy"])
    save_s = statistics.median(r["seconds"] for r in runs["save"])
    peak = max(r["peak_rss_bytes"] for r in runs["save"])
    return {
        "model_bytes": total,
        "num_shards": len(shards),
        "largest_shard_bytes": largest,
        "copy_seconds_median": round(copy_s, 2),
        "save_seconds_median": round(save_s, 2),
        "save_over_copy": round(save_s / copy_s, 2),
        "save_gb_per_s": round(total / save_s / 1e9, 3),
        "copy_gb_per_s": round(total / copy_s / 1e9, 3),
        "save_peak_rss_bytes": peak,
        "import_baseline_rss_bytes": baseline_rss,
        "peak_rss_over_largest_shard": round(peak / largest, 2),
        "net_peak_rss_over_largest_shard": round((peak - baseline_rss) / largest, 2),
    }


def run(cache_dir: Path, repeats: int = 2) -> dict:
    model = ensure_model(cache_dir)
    work = cache_dir / "bench" / "ablate-save-out"
    work.mkdir(parents=True, exist_ok=True)
    before = machine()
    baseline = run_child(IMPORT_ONLY)["peak_rss_bytes"]
    runs = measure(model, work, repeats)
    summary = summarize(model, runs, baseline)
    result = {
        "summary": summary,
        "runs": runs,
        "machine_before": before,
        "machine_after": machine(),
        "model": str(model),
    }
    write_result("ablate_save", result)
    return result


def report(result: dict) -> str:
    s = result["summary"]
    return (
        f"ablate+save {gib(s['model_bytes'])} GiB in {s['num_shards']} shards: {s['save_seconds_median']} s vs copy "
        f"{s['copy_seconds_median']} s -> {s['save_over_copy']}x copy time; peak RSS {gib(s['save_peak_rss_bytes'])} GiB = "
        f"{s['peak_rss_over_largest_shard']}x the largest shard ({gib(s['largest_shard_bytes'])} GiB; "
        f"{s['net_peak_rss_over_largest_shard']}x net of the {gib(s['import_baseline_rss_bytes'])} GiB import baseline); "
        f"load {result['machine_before']['loadavg_1_5_15'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(report(run(args.cache_dir, args.repeats)))


if __name__ == "__main__":
    main()
