"""Probe throughput by batch size (evidence for ``auto_batch_size``'s defaults).

    python bench/batch_sweep.py [--cache-dir DIR] [--model DIR] [--prompts 16] [--sizes 4,8,16,32] [--rounds 2]

Loads the model once (default: Qwen2.5-Coder-1.5B-Instruct) and probes the
same prompts at each batch size, sizes interleaved over the rounds; the
median tokens/s per size is reported next to the automatic choice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DEFAULT_CACHE, machine, write_result  # noqa: E402


def run(model_dir: Path, prompts: int, sizes: list[int], rounds: int) -> dict:
    import mlx.core as mx

    import mlx_abliteration  # noqa: F401
    from mlx_abliteration.data.datasets import load_prompts
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.capture import auto_batch_size, encode_for_probe, probe_prompts
    from mlx_abliteration.probe.positions import ProbeSpec

    model, tokenizer, _ = load_model(model_dir)
    texts = load_prompts(None, "harmful")[:prompts] + load_prompts(None, "harmless")[:prompts]
    ids, _ = encode_for_probe(tokenizer, texts, ProbeSpec())
    tokens = sum(map(len, ids))
    auto = auto_batch_size([len(t) for t in ids])
    probe_prompts(model, tokenizer, texts[:2])  # warm-up
    seconds: dict[int, list[float]] = {s: [] for s in sizes}
    before = machine()
    for _ in range(rounds):
        for size in sizes:
            started = time.perf_counter()
            probe_prompts(model, tokenizer, texts, batch_size=size)
            mx.synchronize()
            seconds[size].append(time.perf_counter() - started)
            print(f"batch {size}: {tokens / seconds[size][-1]:.1f} tok/s", flush=True)
    speed = {str(s): round(tokens / statistics.median(v), 1) for s, v in seconds.items()}
    return {
        "model": str(model_dir),
        "device": str(mx.default_device()),
        "tokens": tokens,
        "prompts": len(texts),
        "auto_batch_size": auto,
        "tokens_per_s": speed,
        "seconds": seconds,
        "machine_before": before,
        "machine_after": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--model", type=Path, help="model dir (default: the converted Qwen2.5-Coder-1.5B-Instruct)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per kind")
    parser.add_argument("--sizes", default="4,8,16,32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.model is None:
        from tests.support.real_models import ensure_model

        args.model = ensure_model("qwen", args.cache_dir)
    result = run(args.model, args.prompts, [int(s) for s in args.sizes.split(",")], args.rounds)
    write_result("batch_sweep", result)
    print(
        f"tokens/s by batch size: {result['tokens_per_s']} (auto picks {result['auto_batch_size']}); "
        f"load {result['machine_before']['loadavg_1_5_15'][0]:.1f}"
    )


if __name__ == "__main__":
    main()
