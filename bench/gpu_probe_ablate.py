"""GPU: probe + ablate + save an 8B-shaped Llama with MLX's CUDA backend, and the same probe in PyTorch.

    python bench/gpu_probe_ablate.py --work /tmp/gpubench --out DIR [--prompts 256]

Runs on an NVIDIA machine with ``mlx[cuda13]``, torch and transformers
(bench/gpu_run.sh installs MLX there from carried wheels). Builds a random
bf16 Llama-3-8B-shaped model, then, in one process:
  probe   our probe_prompts vs transformers (output_hidden_states=True,
          logits for the last position only), bf16, the same token ids and
          length-sorted batches, alternating engines; also a batch-size sweep
  ablate  directions from the probe, one layer's direction on every
          residual writer, save_ablated_model vs copying the model's files
Writes DIR/gpu_probe_ablate.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_abliteration  # noqa: E402,F401

import mlx.core as mx  # noqa: E402

from bench._common import machine  # noqa: E402
from mlx_abliteration.core.datasets import load_prompts  # noqa: E402
from mlx_abliteration.core.positions import ProbeSpec  # noqa: E402
from mlx_abliteration.core.probe import auto_batch_size, encode_for_probe, probe_prompts  # noqa: E402

SWEEP = (8, 16, 32, 64, 128)
SMALL = dict(hidden_size=256, num_layers=4, intermediate_size=512, vocab_size=1024, num_heads=4, num_kv_heads=2)  # --small: a dry run anywhere


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
    from mlx_abliteration.testing import build_synthetic_model, llama_config

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
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=1)
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


def memory(stage: str) -> None:
    import torch

    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    log(f"{stage}: mlx active {mx.get_active_memory() / 2**30:.1f} GiB, cache {mx.get_cache_memory() / 2**30:.1f} GiB, "
        f"peak {mx.get_peak_memory() / 2**30:.1f} GiB; device free {free / 2**30:.1f} GiB")  # fmt: skip


def mlx_phase(path: Path, sets: list, rounds: int) -> dict:
    import numpy as np

    from mlx_abliteration.core.model_io import load_model
    from mlx_abliteration.core.probe import capture_activations

    started = time.perf_counter()
    model, tokenizer, _ = load_model(path)
    log(f"mlx loaded in {time.perf_counter() - started:.1f} s")
    memory("mlx loaded")
    time_mlx(model, tokenizer, [s[:64] for s in sets], None)  # warm-up (kernels, allocator)
    memory("mlx warm")
    runs, stats = [], None
    for _ in range(rounds):
        seconds, stats = time_mlx(model, tokenizer, sets, None)
        runs.append(seconds)
        log(f"mlx round {seconds:.2f} s")
    sweep = {size: min(time_mlx(model, tokenizer, sets, size)[0] for _ in range(2)) for size in SWEEP}  # first pass: new shapes
    check = np.array(capture_activations(model, tokenizer, sets[0][:4], batch_size=1).astype(mx.float32))
    memory("mlx done")
    del model
    mx.clear_cache()
    return {"tokenizer": tokenizer, "runs": runs, "sweep": sweep, "check": check, "stats": stats}


def torch_phase(path: Path, tokenizer, sets: list, rounds: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(torch_device()).eval()
    log(f"torch loaded in {time.perf_counter() - started:.1f} s")
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
    return {"runs": runs, "sweep": sweep, "check": check}


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
        "mlx_tokens_per_s": round(tokens / mlx_s),
        "torch_tokens_per_s": round(tokens / torch_s),
        "mlx_over_torch": round(torch_s / mlx_s, 2),
        "sweep_tokens_per_s": {str(k): {"mlx": round(tokens / ours["sweep"][k]), "torch": round(tokens / theirs["sweep"][k])} for k in SWEEP},
        "relative_activation_difference": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
    }
    return {"summary": summary, "runs_seconds": {"mlx": ours["runs"], "torch": theirs["runs"]}}, ours["stats"]


def ablate_benchmark(path: Path, work: Path, stats) -> dict:
    from mlx_abliteration.core.ablate import uniform_plan
    from mlx_abliteration.core.directions import compute_directions
    from mlx_abliteration.core.model_io import save_ablated_model

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
            shutil.copytree(path, out)
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
        "copy_seconds": round(copy_s, 2),
        "save_seconds": round(save_s, 2),
        "save_over_copy": round(save_s / copy_s, 2),
        "save_peak_mlx_memory_bytes": max(results["save_peak_gpu_bytes"]),
        "save_peak_mlx_memory_over_largest_shard": round(max(results["save_peak_gpu_bytes"]) / largest, 2),
        "runs_seconds": results,
    }


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpubench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpubench-out")))
    parser.add_argument("--prompts", type=int, default=256, help="prompts per kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a small model: check the script on any machine")
    parser.add_argument("--skip-save", action="store_true", help="probe only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"device {mx.default_device()}, {device_name()}")
    path = build(args.work, args.small)
    probe, stats = probe_benchmark(path, args.prompts, args.rounds)
    ablate = None if args.skip_save else ablate_benchmark(path, args.work, stats)
    result = {"gpu": device_name(), "mlx": mx.__version__, "probe": probe, "ablate_save": ablate, "machine": machine()}
    (args.out / "gpu_probe_ablate.json").write_text(json.dumps(result, indent=2, default=str))
    p = probe["summary"]
    print(
        f"GPU {result['gpu']}: probe {p['prompts']} prompts / {p['tokens']} tokens: mlx {p['mlx_tokens_per_s']} tok/s, "
        f"torch {p['torch_tokens_per_s']} tok/s, mlx/torch {p['mlx_over_torch']}x (batch {p['auto_batch_size']}); "
        f"sweep {p['sweep_tokens_per_s']}; activations rel diff {p['relative_activation_difference']:.2e}"
    )
    if ablate:
        print(f"save {ablate['save_seconds']} s vs copy {ablate['copy_seconds']} s ({ablate['save_over_copy']}x) of {ablate['weights_bytes'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
