"""Probing a model whose weights exceed the memory cap: --probe-mode streamed vs memory.

    python bench/streamed_probe.py [--cache-dir DIR] [--cap-gib 1.0] [--prompts 12]

Builds (once, cached) a random-weight bf16 Llama of about 2.3 GB (4.6 GB as
float32 compute weights). Runs, each in a fresh process:
  1. the streamed probe inside a memory cgroup capped at --cap-gib,
  2. the in-memory probe without a cap (the reference directions),
  3. the in-memory probe under the same cap (expected to be killed).
Reports peak RSS, the cgroup's peak usage, time, and the largest difference
between the two probes' directions. Without a writable cgroup (not root,
macOS) run 1 is uncapped and only peak RSS vs the weights is reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, gib, machine, run_child, write_result  # noqa: E402

SHAPE = dict(hidden_size=2048, num_layers=16, intermediate_size=8192, vocab_size=32000, num_heads=16, num_kv_heads=8)

PROBE = """
import json, sys, time
import mlx_abliteration
import mlx.core as mx
from bench._common import peak_rss
from mlx_abliteration.data.datasets import load_prompts
from mlx_abliteration.probe.directions import compute_directions
model_dir, mode, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sets = [load_prompts(None, kind)[:n] for kind in ("harmful", "harmless")]
started = time.perf_counter()
if mode == "streamed":
    from mlx_abliteration.probe.streamed import streamed_probe
    stats = streamed_probe(model_dir, sets)
else:
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.capture import probe_prompts
    model, tokenizer, _ = load_model(model_dir)
    stats = [probe_prompts(model, tokenizer, s) for s in sets]
seconds = time.perf_counter() - started
layers = list(range(stats[0].mean.shape[0]))
directions = compute_directions(stats[0], stats[1], layers, len(layers)).directions
mx.save_safetensors(out, {"directions": directions})
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss(), "prompts": stats[0].count + stats[1].count}))
"""


def ensure_model(cache_dir: Path) -> Path:
    from tests.support.tiny_models import build_synthetic_model, llama_config

    path = cache_dir / "bench" / "synthetic-llama-2g-bf16"
    if not (path / "config.json").exists():
        print(f"building {path} ...", flush=True)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build_synthetic_model(tmp, llama_config(**SHAPE), num_shards=4)
        tmp.rename(path)
    return path


class MemoryCgroup:
    """A child memory cgroup (v1 or v2) of this process's own, removed on exit."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.path: Path | None = None

    def __enter__(self) -> MemoryCgroup:
        for line in Path("/proc/self/cgroup").read_text().splitlines() if Path("/proc/self/cgroup").exists() else []:
            _, controllers, rel = line.split(":", 2)
            v1 = "memory" in controllers.split(",")
            root = Path("/sys/fs/cgroup/memory" if v1 else "/sys/fs/cgroup")
            if v1 or (controllers == "" and (root / "cgroup.controllers").exists()):
                try:
                    self.path = self._make(root / rel.lstrip("/") / f"mlx-abl-bench-{os.getpid()}", v1)
                    return self
                except OSError:
                    self.path = None
        return self

    def _make(self, path: Path, v1: bool) -> Path:
        path.mkdir()
        (path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(self.limit))
        return path

    def peak_usage(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if self.path and (self.path / name).exists():
                return int((self.path / name).read_text().split()[0])
        return None

    def reset_peak(self) -> None:
        if self.path and (self.path / "memory.max_usage_in_bytes").exists():
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def __exit__(self, *exc) -> None:
        if self.path:
            try:
                self.path.rmdir()
            except OSError:
                pass


def capped(cgroup: MemoryCgroup, model: Path, mode: str, prompts: int, out: Path) -> dict:
    cgroup.reset_peak()
    result = run_child(PROBE, str(model), mode, str(prompts), str(out), cgroup=cgroup.path)
    result["cgroup_peak_bytes"] = cgroup.peak_usage()
    result["killed"] = result["returncode"] in (-9, 137)
    result.pop("stderr_tail", None) if result["killed"] else None
    return result


def run(cache_dir: Path, cap_gib: float = 1.0, prompts: int = 12) -> dict:
    import mlx.core as mx

    model = ensure_model(cache_dir)
    work = cache_dir / "bench" / "streamed-out"
    work.mkdir(parents=True, exist_ok=True)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    before = machine()
    with MemoryCgroup(int(cap_gib * 2**30)) as cgroup:
        path = cgroup.path
        streamed = capped(cgroup, model, "streamed", prompts, work / "streamed.safetensors")
        memory = run_child(PROBE, str(model), "memory", str(prompts), str(work / "memory.safetensors"))
        memory_capped = capped(cgroup, model, "memory", prompts, work / "memory-capped.safetensors") if path else None
    if streamed["returncode"] != 0 or memory["returncode"] != 0:
        raise RuntimeError(f"probe failed: {streamed.get('stderr_tail') or memory.get('stderr_tail')}")
    a = mx.load(str(work / "streamed.safetensors"))["directions"]
    b = mx.load(str(work / "memory.safetensors"))["directions"]
    summary = {
        "weights_bytes": weights,
        "float32_compute_weights_bytes": weights * 2,
        "cap_bytes": int(cap_gib * 2**30) if path else None,
        "cgroup": str(path) if path else None,
        "streamed_seconds": round(streamed["seconds"], 2),
        "memory_seconds": round(memory["seconds"], 2),
        "streamed_over_memory_time": round(streamed["seconds"] / memory["seconds"], 2),
        "streamed_peak_rss_bytes": streamed["peak_rss_bytes"],
        "streamed_cgroup_peak_bytes": streamed["cgroup_peak_bytes"],
        "memory_peak_rss_bytes": memory["peak_rss_bytes"],
        "streamed_peak_rss_over_weights": round(streamed["peak_rss_bytes"] / weights, 3),
        "memory_under_cap_killed": memory_capped["killed"] if memory_capped else None,
        "max_abs_direction_diff": float(mx.abs(a - b).max().item()),
        "prompts": streamed["prompts"],
    }
    result = {
        "summary": summary,
        "streamed": streamed,
        "memory": memory,
        "memory_capped": memory_capped,
        "machine_before": before,
        "machine_after": machine(),
        "model": str(model),
    }
    write_result("streamed_probe", result)
    return result


def report(result: dict) -> str:
    s = result["summary"]
    cap = f"under a {gib(s['cap_bytes'])} GiB cgroup cap" if s["cap_bytes"] else "uncapped (no writable cgroup)"
    killed = {True: "killed", False: "NOT killed", None: "not run"}[s["memory_under_cap_killed"]]
    return (
        f"streamed probe of {gib(s['weights_bytes'])} GiB bf16 weights ({gib(s['float32_compute_weights_bytes'])} GiB as float32) "
        f"{cap}: {s['streamed_seconds']} s, peak RSS {gib(s['streamed_peak_rss_bytes'])} GiB "
        f"({s['streamed_peak_rss_over_weights']}x the weights); in-memory {s['memory_seconds']} s, peak RSS "
        f"{gib(s['memory_peak_rss_bytes'])} GiB, under the cap: {killed}; time ratio {s['streamed_over_memory_time']}x; "
        f"max |direction diff| {s['max_abs_direction_diff']:.2e}; load {result['machine_before']['loadavg_1_5_15'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--cap-gib", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=12, help="prompts per kind")
    args = parser.parse_args()
    print(report(run(args.cache_dir, args.cap_gib, args.prompts)))


if __name__ == "__main__":
    main()
