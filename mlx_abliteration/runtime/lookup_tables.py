"""Keep an input-only embedding table in its stored half precision while the model computes in float32.

On the CPU backend models run in float32 (``backend.compute_dtype``): half
precision matmuls are ~16x slower there. A table that is only looked up (not
tied to the output head) needs no matmul, so it can stay bf16/fp16 and have
its rows widened as they are read: the same values (every bf16 value is
exact in float32) in half the memory, 0.47 GB for Qwen2.5-1.5B's
151936 x 1536 table.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

HALF = (mx.bfloat16, mx.float16)


class WideningEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose rows come out in the model's compute dtype."""

    compute_dtype: mx.Dtype = mx.float32

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x).astype(self.compute_dtype)


def input_only_tables(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Dense half-precision embeddings of a model whose output head is a matrix of its own."""
    args: Any = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", True) is not False:
        return []
    matrices = [(p, m) for p, m in model.named_modules() if isinstance(m.get("weight"), mx.array)]
    found: list[tuple[str, nn.Module]] = []
    for path, module in matrices:
        if type(module) is not nn.Embedding or module.weight.dtype not in HALF:
            continue
        shape = module.weight.shape
        if any(p != path and m.weight.shape == shape for p, m in matrices):  # the separate head
            found.append((path, module))
    return found


def keep_compact(stored: list[tuple[nn.Module, mx.array]], compute_dtype: mx.Dtype) -> None:
    """After ``model.set_dtype(compute_dtype)``: put each table's stored weight back, widened on lookup.

    ``stored`` pairs each ``input_only_tables`` module with its weight taken
    before the cast (lazy: it is never materialized in float32).
    """
    for module, weight in stored:
        module.__class__ = WideningEmbedding
        module.compute_dtype = compute_dtype
        module.weight = weight
