"""GPU: probe + ablate + save an 8B-shaped Llama with MLX's CUDA backend, and the same probe in PyTorch.

    python bench/gpu_probe_ablate.py --work /tmp/gpubench --out DIR [--prompts 256]

Runs on an NVIDIA machine with ``mlx[cuda13]``, torch and transformers
(bench/gpu_run.sh installs MLX there from carried wheels). Builds a random
bf16 Llama-3-8B-shaped model, then, in one process:
  probe   our probe_prompts vs transformers (output_hidden_states=True,
          logits for the last position only), bf16, the same token ids and
          length-sorted batches, alternating engines; also a batch-size sweep
  ablate  directions from the probe, one layer's direction on every
          residual writer, save_ablated_model vs `cp -r` of the model's files
          (both followed by sync)
  cli     (--cli-runs N) the whole `mlx-abliterate run --no-eval --use-layer
          auto --max-prompts P` in a fresh process, before anything else
          touches the GPU: wall time, phase times from its --json events,
          sync time, GPU memory (nvidia-smi) at its peak and when it ends vs
          MLX's own peak counter
Also: load time (mlx load_model vs transformers from_pretrained + .to(cuda)),
the first probe pass of the process vs the warm rounds, and GPU memory held
(nvidia-smi) vs MLX's counters after each phase.
Writes DIR/gpu_probe_ablate.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import mlx_abliteration  # noqa: E402,F401
from bench._common import machine  # noqa: E402
from mlx_abliteration.data.datasets import load_prompts  # noqa: E402
from mlx_abliteration.probe.capture import auto_batch_size, encode_for_probe, probe_prompts  # noqa: E402
from mlx_abliteration.probe.positions import ProbeSpec  # noqa: E402

SWEEP = (8, 16, 32, 64, 128)
SMALL = dict(
    hidden_size=256, num_layers=4, intermediate_size=512, vocab_size=1024, num_heads=4, num_kv_heads=2
)  # --small: a dry run anywhere


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(work: Path, small: bool) -> Path:
    from tests.support.tiny_models import build_synthetic_model, llama_config

    shape = SMALL if small else {}
    path = work / ("llama-small-bf16" if small else "llama-8b-shape-bf16")
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        started = time.perf_counter()
        build_synthetic_model(path, llama_config(**shape), num_shards=5)
        log(f"built {path} in {time.perf_counter() - started:.1f} s")
    return path


def batches(tokenizer, prompts: list[str], size: int | None) -> tuple[list[list[list[int]]], int]:
    ids, _ = encode_for_probe(tokenizer, prompts, ProbeSpec())
    size = size or auto_batch_size([len(t) for t in ids])
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    return [[ids[i] for i in order[s : s + size]] for s in range(0, len(order), size)], sum(map(len, ids))


def time_mlx(model, tokenizer, sets, batch_size) -> tuple[float, list]:
    started = time.perf_counter()
    stats = [probe_prompts(model, tokenizer, s, batch_size=batch_size) for s in sets]
    mx.synchronize()
    return time.perf_counter() - started, stats


def torch_forward(model, rows: list[list[int]], pad: int):
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=torch_device())
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=torch_device())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=1
        )
    return torch.stack([h[:, -1, :] for h in out.hidden_states[1:]], 1).float()


def time_torch(model, tokenizer, sets, batch_size) -> float:
    pad = tokenizer.pad_token_id or 0
    plan = [batches(tokenizer, s, batch_size)[0] for s in sets]
    synchronize()
    started = time.perf_counter()
    for rows in plan:
        for batch in rows:
            torch_forward(model, batch, pad)
    synchronize()
    return time.perf_counter() - started


def gpu_used_bytes() -> int | None:
    """GPU memory in use as the driver sees it (nvidia-smi, whole card), or None without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


MEMORY: dict[str, dict] = {}


def memory(stage: str) -> None:
    used = gpu_used_bytes()
    MEMORY[stage] = {
        "mlx_active": mx.get_active_memory(),
        "mlx_cache": mx.get_cache_memory(),
        "mlx_peak": mx.get_peak_memory(),
        "nvidia_smi_used": used,
    }
    log(
        f"{stage}: mlx active {mx.get_active_memory() / 2**30:.1f} GiB, cache {mx.get_cache_memory() / 2**30:.1f} GiB, "
        f"peak {mx.get_peak_memory() / 2**30:.1f} GiB; nvidia-smi used {(used or 0) / 2**30:.1f} GiB"
    )


def mlx_phase(path: Path, sets: list, rounds: int) -> dict:
    import numpy as np

    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.capture import capture_activations

    started = time.perf_counter()
    model, tokenizer, _ = load_model(path)
    mx.synchronize()
    load_s = time.perf_counter() - started
    log(f"mlx loaded in {load_s:.1f} s")
    memory("mlx loaded")
    first_s, _ = time_mlx(model, tokenizer, sets, None)  # the process's first probe: kernels compiled, allocator filled
    log(f"mlx first round {first_s:.2f} s")
    memory("mlx first round")
    runs, stats = [], None
    for _ in range(rounds):
        seconds, stats = time_mlx(model, tokenizer, sets, None)
        runs.append(seconds)
        log(f"mlx round {seconds:.2f} s")
    sweep = {
        size: min(time_mlx(model, tokenizer, sets, size)[0] for _ in range(2)) for size in SWEEP
    }  # first pass: new shapes
    check = np.array(capture_activations(model, tokenizer, sets[0][:4], batch_size=1).astype(mx.float32))
    memory("mlx done")
    del model
    mx.clear_cache()
    return {
        "tokenizer": tokenizer,
        "runs": runs,
        "sweep": sweep,
        "check": check,
        "stats": stats,
        "load_s": load_s,
        "first_s": first_s,
    }


def torch_phase(path: Path, tokenizer, sets: list, rounds: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(torch_device()).eval()
    synchronize()
    load_s = time.perf_counter() - started
    log(f"torch loaded in {load_s:.1f} s")
    time_torch(model, tokenizer, [s[:64] for s in sets], None)
    runs = []
    for _ in range(rounds):
        runs.append(time_torch(model, tokenizer, sets, None))
        log(f"torch round {runs[-1]:.2f} s")
    sweep = {size: min(time_torch(model, tokenizer, sets, size) for _ in range(2)) for size in SWEEP}
    ids, _ = encode_for_probe(tokenizer, sets[0][:4], ProbeSpec())
    check = np.concatenate([torch_forward(model, [r], tokenizer.pad_token_id or 0).cpu().numpy() for r in ids])
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"runs": runs, "sweep": sweep, "check": check, "load_s": load_s}


def probe_benchmark(path: Path, prompts: int, rounds: int) -> tuple[dict, list]:
    """One engine at a time (the GPU is not shared, so no interleaving is needed; 2 x 16 GB did not fit beside the caches)."""
    import numpy as np

    sets = [load_prompts(None, kind)[:prompts] for kind in ("harmful", "harmless")]
    ours = mlx_phase(path, sets, rounds)
    tokenizer = ours["tokenizer"]
    theirs = torch_phase(path, tokenizer, sets, rounds)
    tokens = sum(batches(tokenizer, s, None)[1] for s in sets)
    mlx_s, torch_s = statistics.median(ours["runs"]), statistics.median(theirs["runs"])
    layers = ours["check"].shape[1] - 1  # HF's last hidden state is after the final norm
    a, b = ours["check"][:, :layers], theirs["check"][:, :layers]
    summary = {
        "prompts": 2 * prompts,
        "tokens": tokens,
        "auto_batch_size": len(batches(tokenizer, sets[0], None)[0][0]),
        "mlx_load_seconds": round(ours["load_s"], 2),
        "torch_load_seconds": round(theirs["load_s"], 2),
        "mlx_load_over_torch": round(ours["load_s"] / theirs["load_s"], 2),
        "mlx_first_round_tokens_per_s": round(tokens / ours["first_s"]),
        "mlx_first_over_warm": round(mlx_s / ours["first_s"], 2),
        "mlx_tokens_per_s": round(tokens / mlx_s),
        "torch_tokens_per_s": round(tokens / torch_s),
        "mlx_over_torch": round(torch_s / mlx_s, 2),
        "sweep_tokens_per_s": {
            str(k): {"mlx": round(tokens / ours["sweep"][k]), "torch": round(tokens / theirs["sweep"][k])}
            for k in SWEEP
        },
        "relative_activation_difference": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
    }
    return {
        "summary": summary,
        "runs_seconds": {"mlx_first": ours["first_s"], "mlx": ours["runs"], "torch": theirs["runs"]},
    }, ours["stats"]


def ablate_benchmark(path: Path, work: Path, stats) -> dict:
    from mlx_abliteration.edit.orthogonalize import uniform_plan
    from mlx_abliteration.export.save import save_ablated_model
    from mlx_abliteration.probe.directions import compute_directions

    layers = list(range(stats[0].mean.shape[0]))
    directions = compute_directions(stats[0], stats[1], layers, len(layers))
    plan = uniform_plan(directions.direction(len(layers) // 2), len(layers))
    results = {}
    for kind in ("copy", "save", "copy", "save"):
        out = work / f"out-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        mx.reset_peak_memory()
        started = time.perf_counter()
        if kind == "copy":
            subprocess.run(["cp", "-r", str(path), str(out)], check=True)
        else:
            save_ablated_model(path, out, plan)
        os.sync()
        results.setdefault(kind, []).append(time.perf_counter() - started)
        if kind == "save":
            results.setdefault("save_peak_gpu_bytes", []).append(mx.get_peak_memory())
        log(f"{kind}: {results[kind][-1]:.1f} s")
        shutil.rmtree(out, ignore_errors=True)
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in path.glob("*.safetensors"))
    copy_s, save_s = statistics.median(results["copy"]), statistics.median(results["save"])
    return {
        "weights_bytes": weights,
        "largest_shard_bytes": largest,
        "copy": "cp -r + os.sync()",
        "copy_seconds": round(copy_s, 2),
        "save_seconds": round(save_s, 2),
        "save_over_copy": round(save_s / copy_s, 2),
        "save_peak_mlx_memory_bytes": max(results["save_peak_gpu_bytes"]),
        "save_peak_mlx_memory_over_largest_shard": round(max(results["save_peak_gpu_bytes"]) / largest, 2),
        "runs_seconds": results,
    }


_CLI_CHILD = """
import json, os, sys, time
started = time.perf_counter()
from mlx_abliteration.cli.main import main
code = main(sys.argv[2:])
finished = time.perf_counter() - started
import mlx.core as mx
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from gpu_probe_ablate import gpu_used_bytes
smi = time.perf_counter()
used = gpu_used_bytes()
smi = time.perf_counter() - smi
with open(os.environ["GPU_BENCH_CHILD_JSON"], "w") as f:
    json.dump({"returncode": code, "main_seconds": finished, "nvidia_smi_used_at_end": used, "mlx_peak": mx.get_peak_memory(),
               "mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
               "seconds_after_main": time.perf_counter() - started - finished, "nvidia_smi_seconds": smi}, f)
raise SystemExit(code)
"""


def _poll_gpu_peak(done: threading.Event, peak: list[int]) -> None:
    while not done.wait(0.25):
        peak[0] = max(peak[0], gpu_used_bytes() or 0)


def _phase_marks(events: list[dict]) -> dict[str, float | None]:
    """Seconds from the process start at which each stage of `run --json` began."""

    def at(prefix: str) -> float | None:
        kinds = ("stage", "layers", "done")
        return next(
            (e["t"] for e in events if e.get("event") in kinds and e.get("message", "").startswith(prefix)), None
        )

    return {
        "loading": at("loading"),
        "writers": at("finding the residual writers"),
        "probing": at("probing"),
        "choosing": at("choosing the layer"),
        "chosen": at("auto-selected"),
        "saving": at("saving"),
        "done": at("finished"),
    }


def _span(marks: dict, a: str, b: str) -> float | None:
    return round(marks[b] - marks[a], 2) if marks[a] is not None and marks[b] is not None else None


def cli_benchmark(path: Path, work: Path, prompts: int, runs: int) -> list[dict]:
    """`mlx-abliterate run --no-eval --use-layer auto` in fresh processes: wall, phases, sync, GPU memory."""
    results = []
    script = str(Path(__file__).resolve())
    for run in range(runs):
        out = work / "cli-out"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        baseline = gpu_used_bytes() or 0
        argv = [
            "run",
            "-m",
            str(path),
            "-o",
            str(out),
            "--no-eval",
            "--use-layer",
            "auto",
            "--max-prompts",
            str(prompts),
            "--json",
        ]
        child_file = work / "cli-child.json"
        child_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": f"{Path(script).parent.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "GPU_BENCH_CHILD_JSON": str(child_file),
        }
        peak = [baseline]
        done = threading.Event()

        poller = threading.Thread(target=_poll_gpu_peak, args=(done, peak), daemon=True)
        poller.start()
        events = []
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI_CHILD, script, *argv], stdout=subprocess.PIPE, text=True, env=env
        )
        for line in proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                event["t"] = round(time.perf_counter() - started, 3)
                events.append({k: v for k, v in event.items() if k != "stats"})
        proc.wait()
        wall = time.perf_counter() - started
        done.set()
        poller.join()
        synced = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - synced
        child = json.loads(child_file.read_text()) if child_file.exists() else {}
        child_file.unlink(missing_ok=True)

        marks = _phase_marks(events)

        probe_s = next((e["probe_seconds"] for e in events if "probe_seconds" in e), None)
        result = {
            "command": "mlx-abliterate " + " ".join(argv),
            "returncode": proc.returncode,
            "wall_seconds": round(wall, 2),
            # the same less the benchmark's own reading of GPU memory in the child at its end (nvidia-smi)
            "wall_seconds_less_measurement": round(wall - child.get("nvidia_smi_seconds", 0.0), 2) if child else None,
            "sync_seconds_after": round(sync_s, 2),
            "phases_seconds": {
                "startup_imports": marks["loading"],
                "load": _span(marks, "loading", "writers"),
                "writers": _span(marks, "writers", "probing"),
                "probe_stage": _span(marks, "probing", "choosing"),
                "probe_reported": probe_s and round(probe_s, 2),
                "auto_layer": _span(marks, "choosing", "chosen"),
                "save": _span(marks, "saving", "done"),
                "exit_after_done": round(wall - marks["done"], 2) if marks["done"] else None,
            },
            "gpu_baseline_used": baseline,
            "gpu_peak_used_during_run": peak[0],
            "gpu_peak_over_baseline": peak[0] - baseline,
            "child": child,
            "gpu_held_at_end_over_baseline": (child.get("nvidia_smi_used_at_end") or 0) - baseline if child else None,
            "events": events,
        }
        weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        result["gpu_held_at_end_over_model_size"] = (
            round(result["gpu_held_at_end_over_baseline"] / weights, 2) if child else None
        )
        log(
            f"cli run {run + 1}: rc {proc.returncode}, {wall:.1f} s ({result['wall_seconds_less_measurement']} s less the "
            f"child's nvidia-smi) + sync {sync_s:.1f} s; phases {result['phases_seconds']}; "
            f"GPU held at end {(result['gpu_held_at_end_over_baseline'] or 0) / 2**30:.1f} GiB, mlx peak {child.get('mlx_peak', 0) / 2**30:.1f} GiB"
        )
        results.append(result)
        shutil.rmtree(out, ignore_errors=True)
    return results


def device_name() -> str:
    try:
        import torch
    except ImportError:
        return "cpu (no torch)"

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpubench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpubench-out")))
    parser.add_argument("--prompts", type=int, default=256, help="prompts per kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a small model: check the script on any machine")
    parser.add_argument("--skip-save", action="store_true", help="probe only")
    parser.add_argument(
        "--cli-runs", type=int, default=0, help="whole `mlx-abliterate run --no-eval --use-layer auto` processes, first"
    )
    parser.add_argument(
        "--cli-only", action="store_true", help="only the --cli-runs (no in-process probe/ablate benchmark)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"device {mx.default_device()}")
    path = build(args.work, args.small)
    cli = cli_benchmark(path, args.work, args.prompts, args.cli_runs) if args.cli_runs else None
    result = {"gpu": device_name(), "mlx": mx.__version__, "cli_run": cli, "machine": machine()}
    if args.cli_only:
        (args.out / "gpu_probe_ablate.json").write_text(json.dumps(result, indent=2, default=str))
        return
    probe, stats = probe_benchmark(path, args.prompts, args.rounds)
    memory("after probe benchmark")
    ablate = None if args.skip_save else ablate_benchmark(path, args.work, stats)
    memory("after ablate benchmark")
    result.update(
        probe=probe,
        ablate_save=ablate,
        memory=MEMORY,
        model_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors")),
    )
    (args.out / "gpu_probe_ablate.json").write_text(json.dumps(result, indent=2, default=str))
    p = probe["summary"]
    print(
        f"GPU {result['gpu']}: probe {p['prompts']} prompts / {p['tokens']} tokens: mlx {p['mlx_tokens_per_s']} tok/s, "
        f"torch {p['torch_tokens_per_s']} tok/s, mlx/torch {p['mlx_over_torch']}x (batch {p['auto_batch_size']}); "
        f"sweep {p['sweep_tokens_per_s']}; activations rel diff {p['relative_activation_difference']:.2e}; "
        f"load mlx {p['mlx_load_seconds']} s vs torch {p['torch_load_seconds']} s; first round {p['mlx_first_round_tokens_per_s']} tok/s "
        f"({p['mlx_first_over_warm']} of warm)"
    )
    if ablate:
        print(
            f"save {ablate['save_seconds']} s vs copy {ablate['copy_seconds']} s ({ablate['save_over_copy']}x) of {ablate['weights_bytes'] / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
