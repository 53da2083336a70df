"""A rank-1 mlx-lm LoRA adapter instead of a full abliterated copy (``export-adapter`` / ``ablate --adapter-only``).

For a linear writer ``W' = W - s u (u^T W) = W + (-s u)(u^T W)``. mlx-lm's
``LoRALinear`` computes ``y = W x + scale * (x @ lora_a) @ lora_b`` with
``lora_a`` (in, r) and ``lora_b`` (r, out); with r = 1, scale = 1,
``lora_a = W^T u`` and ``lora_b = -s u^T`` give exactly ``W' x``. ``u`` is the
plan's direction for that writer (``plan.direction(writer)``: post-norm writers
use the gain-weighted one), ``s`` its strength. A quantized source is
dequantized to compute ``W^T u``, so the adapter holds the full-precision edit.

What the adapter format cannot express is listed, never silently dropped:
embedding rows (mlx-lm only wraps modules inside the decoder layers), biases
(LoRA adds no constant), MoE expert stacks (per-expert ``W^T u`` would need
LoRASwitchLinear's per-expert A and a shared B: not written here), and
``--norm-preserve`` (a per-column rescale is not rank-1: refused).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.edit.orthogonalize import AblationPlan, check_finite, check_shape
from mlx_abliteration.errors import UserError
from mlx_abliteration.export.model_card import model_card
from mlx_abliteration.runtime.mx_types import scalar

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def _layer_key(path: str, layer: int) -> str | None:
    match = re.search(rf"(?:^|\.)layers\.{layer}\.(.+)$", path)
    return match.group(1) if match else None


def _dense_weight(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedLinear):
        return mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits, module.mode)
    return module.weight


def adapter_tensors(model: nn.Module, plan: AblationPlan) -> tuple[dict, list[str], list[str]]:
    """(adapter tensors by parameter name, layer-relative keys, what the adapter cannot express)."""
    if plan.norm_preserve:
        raise UserError(
            "--norm-preserve rescales every edited column: not a rank-1 update, so no adapter can express it"
        )
    if plan.writers is None:
        raise ValueError("the plan has no writers yet: bind it to a model with with_writers()")
    modules = dict(model.named_modules())
    tensors, keys, missing = {}, set(), []
    for path, writer in sorted(plan.writers.items()):
        if plan.writer(path) is None:
            continue
        module = modules.get(path)
        if writer.rows:
            missing.append(
                f"embedding rows of `{path}` (E' = E - s (E r) r^T; mlx-lm adapters wrap only decoder-layer modules)"
            )
            continue
        key = _layer_key(path, writer.layer) if writer.layer is not None else None
        if key is None or not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            missing.append(f"`{path}` ({type(module).__name__}: no rank-1 LoRA form written for it)")
            continue
        s = plan.strength(writer.role, writer.layer)
        u = plan.direction(writer).astype(mx.float32)
        w = _dense_weight(module).astype(mx.float32)
        check_shape(path, False, w, u)  # the edit's own checks: a direction of this model, finite tensors
        lora_a, lora_b = (u @ w)[:, None], (-s * u)[None, :]  # W^T u: (in, 1); (1, out)
        check_finite(path, scalar(mx.abs(lora_a).sum() + mx.abs(lora_b).sum()), {}, s)
        tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = lora_a, lora_b
        keys.add(key)
        if "bias" in module:
            missing.append(f"bias of `{path}` (b' = b - s u u^T b; LoRA adds no constant)")
    if not tensors:
        raise UserError("none of the edited writers can be expressed as an mlx-lm adapter; save the full model instead")
    mx.eval(tensors)
    return tensors, sorted(keys), missing


def write_adapter(out: Path, model: nn.Module, plan: AblationPlan, record: dict, num_layers: int) -> dict:
    """Write ``adapters.safetensors``, ``adapter_config.json``, the log and the card into ``out`` (a fresh dir)."""

    tensors, keys, missing = adapter_tensors(model, plan)
    mx.save_safetensors(str(out / ADAPTER_FILE), tensors, metadata={"format": "mlx"})
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": 1, "scale": 1.0, "dropout": 0.0, "keys": keys},
        "model": record.get("source_model"),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    summary = {
        "modules": len(tensors) // 2,
        "keys": keys,
        "size_bytes": (out / ADAPTER_FILE).stat().st_size,
        "not_expressed": missing,
    }
    record = {**record, "adapter": summary}
    (out / "abliteration_log.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "README.md").write_text(model_card(record, adapter=summary))
    return summary
