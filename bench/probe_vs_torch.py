"""Probe throughput: our MLX probe vs Hugging Face transformers + PyTorch CPU.

    python bench/probe_vs_torch.py [--cache-dir DIR] [--prompts 80] [--rounds 1] [--skip-qwen]

The same prompts (packaged harmful + harmless sets, through the chat
template), the same token ids and the same length-sorted batches go to:
  mlx         probe_prompts (wrapped decoder layers, stops after the deepest
              probed layer, float32 + OpenBLAS on the CPU)
  torch-fp32  transformers with output_hidden_states=True (what Heretic and
              other PyTorch tools do), logits only for the last position
  torch-bf16  the same in bfloat16
Each engine runs in its own process (one model in memory at a time), in
rounds A, B, C, A, B, C... so machine load hits all of them alike. Tokens/s
counts real (unpadded) prompt tokens. The last-token activations of a few
prompts are compared across engines as a correctness check.
Needs the bench extra: pip install -e .[bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, machine, run_child, write_result  # noqa: E402

ENGINES = ("mlx", "torch-fp32", "torch-bf16")
HERETIC_SECONDS_160 = 19.0  # DESIGN.md: Heretic 1.4.0, Qwen2.5-Coder-1.5B, 80+80 prompts, this machine type
CHECK_PROMPTS = 4

CHILD = """
import json, os, sys, time
import mlx_abliteration
import mlx.core as mx
import numpy as np
from bench._common import peak_rss
from mlx_abliteration.data.datasets import load_prompts
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.positions import ProbeSpec
from mlx_abliteration.probe.capture import auto_batch_size, capture_activations, encode_for_probe, probe_prompts
model_dir, engine, n, check_file, n_check = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sets = [load_prompts(None, kind)[:n] for kind in ("harmful", "harmless")]

def batches(tokenizer, prompts):
    ids, _ = encode_for_probe(tokenizer, prompts, ProbeSpec())
    size = auto_batch_size([len(t) for t in ids])
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    return [[ids[i] for i in order[s:s + size]] for s in range(0, len(order), size)], sum(map(len, ids)), size

if engine == "mlx":
    model, tokenizer, _ = load_model(model_dir)
    probe_prompts(model, tokenizer, sets[0][:2])  # warm-up
    started = time.perf_counter()
    for prompts in sets:
        probe_prompts(model, tokenizer, prompts)
    seconds = time.perf_counter() - started
    check = np.array(capture_activations(model, tokenizer, sets[0][:n_check], batch_size=1))
    tokens = sum(batches(tokenizer, p)[1] for p in sets)
    size = batches(tokenizer, sets[0])[2]
else:
    import torch
    from transformers import AutoModelForCausalLM
    from mlx_lm.utils import load_tokenizer
    torch.set_num_threads(os.cpu_count())
    dtype = torch.float32 if engine == "torch-fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = load_tokenizer(model_dir)
    pad = tokenizer.pad_token_id or 0

    def forward(rows):
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=1)
        return torch.stack([h[:, -1, :] for h in out.hidden_states[1:]], 1).float()

    forward(batches(tokenizer, sets[0][:2])[0][0])  # warm-up
    plan = [batches(tokenizer, p) for p in sets]
    started = time.perf_counter()
    for rows, _, _ in plan:
        for batch in rows:
            forward(batch)
    seconds = time.perf_counter() - started
    ids, _ = encode_for_probe(tokenizer, sets[0][:n_check], ProbeSpec())
    check = torch.cat([forward([r]) for r in ids]).numpy()
    tokens, size = sum(p[1] for p in plan), plan[0][2]
np.save(check_file, check)
print(json.dumps({"seconds": seconds, "tokens": tokens, "prompts": sum(map(len, sets)), "batch_size": size,
                  "tokens_per_s": tokens / seconds, "peak_rss_bytes": peak_rss()}))
"""


def ensure_tiny(cache_dir: Path) -> Path:
    from tests.support.tiny_models import build_tiny_model

    path = cache_dir / "bench" / "tiny-llama-256"
    if not (path / "config.json").exists():
        build_tiny_model(path, arch="llama", hidden_size=256, num_layers=4, tie=False)
    return path


def compare_model(name: str, model_dir: Path, prompts: int, rounds: int, work: Path) -> dict:
    runs = {engine: [] for engine in ENGINES}
    for _ in range(rounds):
        for engine in ENGINES:
            out = work / f"{name}-{engine}.npy"
            result = run_child(CHILD, str(model_dir), engine, str(prompts), str(out), str(CHECK_PROMPTS))
            if result["returncode"] != 0:
                raise RuntimeError(f"{name} {engine} failed: {result.get('stderr_tail')}")
            runs[engine].append(result)
    return {"model": str(model_dir), "runs": runs, "summary": summarize(runs, work, name)}


def summarize(runs: dict, work: Path, name: str) -> dict:
    import numpy as np

    speed = {engine: statistics.median(r["tokens_per_s"] for r in rs) for engine, rs in runs.items()}
    seconds = {engine: statistics.median(r["seconds"] for r in rs) for engine, rs in runs.items()}
    reference = np.load(work / f"{name}-mlx.npy")
    agreement = {}
    for engine in ENGINES[1:]:
        other = np.load(work / f"{name}-{engine}.npy")
        layers = min(reference.shape[1], other.shape[1]) - 1  # HF's last hidden state is after the final norm
        a, b = reference[:, :layers], other[:, :layers]
        agreement[engine] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    first = runs["mlx"][0]
    return {
        "prompts": first["prompts"],
        "tokens": first["tokens"],
        "batch_size": first["batch_size"],
        "tokens_per_s": {k: round(v, 1) for k, v in speed.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "mlx_over_torch_fp32": round(speed["mlx"] / speed["torch-fp32"], 2),
        "mlx_over_torch_bf16": round(speed["mlx"] / speed["torch-bf16"], 2),
        "relative_activation_difference_vs_mlx": agreement,
    }


def run(cache_dir: Path, prompts: int = 80, rounds: int = 1, skip_qwen: bool = False, label: str = "") -> dict:
    work = cache_dir / "bench" / "probe-vs-torch"
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine_before": machine()}
    result["tiny"] = compare_model("tiny", ensure_tiny(cache_dir), prompts, max(rounds, 2), work)
    if not skip_qwen:
        from tests.support.real_models import ensure_model

        qwen = compare_model("qwen", ensure_model("qwen", cache_dir), prompts, rounds, work)
        mlx_seconds = qwen["summary"]["seconds"]["mlx"]
        qwen["summary"]["heretic_seconds_160_prompts"] = HERETIC_SECONDS_160
        qwen["summary"]["mlx_seconds_per_160_prompts"] = round(mlx_seconds * 160 / qwen["summary"]["prompts"], 1)
        result["qwen"] = qwen
    result["machine_after"] = machine()
    write_result("probe_vs_torch" + (f"_{label}" if label else ""), result)
    return result


def report(result: dict) -> str:
    lines = []
    for name in ("tiny", "qwen"):
        if name not in result:
            continue
        s = result[name]["summary"]
        tps = ", ".join(f"{k} {v} tok/s" for k, v in s["tokens_per_s"].items())
        lines.append(
            f"probe {name}: {s['prompts']} prompts, {s['tokens']} tokens, batch {s['batch_size']}: {tps}; "
            f"mlx/torch-fp32 {s['mlx_over_torch_fp32']}x, mlx/torch-bf16 {s['mlx_over_torch_bf16']}x"
        )
        if "heretic_seconds_160_prompts" in s:
            lines.append(
                f"  160 prompts: mlx {s['mlx_seconds_per_160_prompts']} s vs Heretic's {s['heretic_seconds_160_prompts']} s (DESIGN.md)"
            )
    lines.append(
        f"  load before/after: {result['machine_before']['loadavg_1_5_15'][0]:.1f}/{result['machine_after']['loadavg_1_5_15'][0]:.1f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--prompts", type=int, default=80, help="prompts per kind (80+80 = Heretic's setting)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of mlx, torch-fp32, torch-bf16 on Qwen (tiny: at least 2)"
    )
    parser.add_argument("--skip-qwen", action="store_true")
    parser.add_argument("--label", default="", help="results go to bench/results/probe_vs_torch_LABEL.json")
    args = parser.parse_args()
    print(report(run(args.cache_dir, args.prompts, args.rounds, args.skip_qwen, args.label)))


if __name__ == "__main__":
    main()
