"""MLX's quantized storage: the parameters of a quantized matrix, and packing/unpacking it in float32."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class QuantParams:
    group_size: int
    bits: int
    mode: str = "affine"
    scales_dtype: mx.Dtype | None = None  # stored dtype of scales/biases, for dense twins


def dequantize_leaves(leaves: dict[str, mx.array], quant: QuantParams) -> mx.array:
    return mx.dequantize(
        leaves["weight"],
        leaves["scales"],
        leaves.get("biases"),
        group_size=quant.group_size,
        bits=quant.bits,
        mode=quant.mode,
    ).astype(mx.float32)


def quantize_weight(w: mx.array, quant: QuantParams, scales_dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """Pack ``w``; scales/biases are cast to ``scales_dtype`` (the stored dtype)."""
    packed = mx.quantize(w, group_size=quant.group_size, bits=quant.bits, mode=quant.mode)
    out = {"weight": packed[0], "scales": packed[1]}
    if len(packed) > 2 and packed[2] is not None:
        out["biases"] = packed[2]
    if scales_dtype is not None and out["scales"].dtype != mx.uint8:  # uint8: fp4/fp8 exponent scales
        out["scales"] = out["scales"].astype(scales_dtype)
        if "biases" in out:
            out["biases"] = out["biases"].astype(scales_dtype)
    return out
