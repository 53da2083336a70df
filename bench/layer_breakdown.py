"""Where a CPU forward pass spends its time: one Qwen2.5-1.5B-shaped decoder
layer (random float32 weights), split into its matmuls, attention and SiLU.

    python bench/layer_breakdown.py [--batch 16] [--tokens 24]

Explains the probe's throughput on Linux CPUs (bench/README.md, section 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models import qwen2  # noqa: E402

import mlx_abliteration  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from bench._common import machine, write_result  # noqa: E402

QWEN_1_5B = dict(
    model_type="qwen2",
    hidden_size=1536,
    num_hidden_layers=1,
    intermediate_size=8960,
    num_attention_heads=12,
    rms_norm_eps=1e-6,
    vocab_size=1000,
    num_key_value_heads=2,
    rope_theta=1e6,
    tie_word_embeddings=True,
)


def milliseconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def breakdown(batch: int, tokens: int) -> dict:
    mx.set_default_device(mx.cpu)
    layer = qwen2.TransformerBlock(qwen2.ModelArgs(**QWEN_1_5B))
    mx.eval(layer.parameters())
    x = mx.random.normal((batch, tokens, QWEN_1_5B["hidden_size"]))
    h = layer.input_layernorm(x)
    attn, mlp = layer.self_attn, layer.mlp
    gate, up = mlp.gate_proj(h), mlp.up_proj(h)
    mx.eval(x, h, gate, up)
    matmuls = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj]
    times = {
        "layer": milliseconds(lambda: mx.eval(layer(x, "causal", None))),
        "matmuls": milliseconds(lambda: mx.eval([m(h) for m in matmuls] + [mlp.down_proj(up)])),
        "attention_without_projections": milliseconds(lambda: mx.eval(attn(h, "causal", None)))
        - milliseconds(lambda: mx.eval([m(h) for m in matmuls[:4]])),
        "silu_times_up": milliseconds(lambda: mx.eval(nn.silu(gate) * up)),
        "exp_alone": milliseconds(lambda: mx.eval(mx.exp(gate))),
        "multiply_alone": milliseconds(lambda: mx.eval(gate * up)),
    }
    params = sum(m.weight.size for m in matmuls) + mlp.down_proj.weight.size
    flops = 2 * batch * tokens * params
    return {
        "batch": batch,
        "tokens": tokens,
        "milliseconds": {k: round(v, 2) for k, v in times.items()},
        "gflops_per_s": {
            "layer": round(flops / times["layer"] / 1e6),
            "matmuls": round(flops / times["matmuls"] / 1e6),
        },
        "silu_share_of_layer": round(times["silu_times_up"] / times["layer"], 3),
        "elements_per_silu": gate.size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--tokens", type=int, default=24, help="new tokens per row (the probe continues a shared prefix)"
    )
    args = parser.parse_args()
    result = {"machine": machine(), **breakdown(args.batch, args.tokens)}
    print(result)
    write_result("layer_breakdown", result)


if __name__ == "__main__":
    main()
