"""Apply an ablation plan to a model in memory (``revertible_edit.TrialEditor`` also reverts it).

Uses the same per-module math as the streaming save (``orthogonalize.edit_module``),
so an in-memory edit equals the saved weights (up to the compute dtype).
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..core.probe import decoder_layers
from ..core.writers import model_writers
from .dense_twins import dense_module
from .orthogonalize import (
    DEFAULT_TARGETS,
    AblationPlan,
    EditReport,
    QuantParams,
    edit_module,
    select_writers,
    uniform_plan,
)


def bind(model: nn.Module, plan: AblationPlan) -> AblationPlan:
    """``plan`` on the writers of ``model`` (found once per model) unless it already has its writers."""
    return plan if plan.writers is not None else plan.with_writers(model_writers(model))


def writer_modules(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[tuple[str, nn.Module]]:
    """(path, module) of every residual writer of ``model`` that ``targets`` selects."""
    chosen = select_writers(model_writers(model), targets)
    return [(path, module) for path, module in model.named_modules() if path in chosen]


def _leaves(module: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def _quant(module: nn.Module) -> QuantParams | None:
    """How the module is stored: packed here, or a dense twin of a quantized matrix."""
    if "scales" not in module:
        return getattr(module, "_storage_quant", None)
    return QuantParams(module.group_size, module.bits, getattr(module, "mode", "affine"))


def _as_plan(
    model: nn.Module, refusal_vector: mx.array | AblationPlan, ablation_strength: float, target_modules: tuple[str, ...]
) -> AblationPlan:
    if isinstance(refusal_vector, AblationPlan):
        return refusal_vector
    return uniform_plan(refusal_vector, len(decoder_layers(model)), ablation_strength, targets=target_modules)


def get_ablated_parameters(
    model: nn.Module,
    refusal_vector: mx.array | AblationPlan,
    ablation_strength: float = 1.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    storage_dtype: mx.Dtype | None = None,
) -> dict[str, mx.array]:
    """Flat ``{parameter name: edited array}`` for every edited writer.

    ``refusal_vector`` is a unit direction [H] (used for every layer and the
    embedding) or an ``AblationPlan``. Quantized writers come back
    requantized with their own group size, bits and mode.
    """
    plan = _as_plan(model, refusal_vector, ablation_strength, tuple(target_modules))
    params, _ = _edit_all(model, plan, storage_dtype)
    return params


def _edit_all(
    model: nn.Module, plan: AblationPlan, storage_dtype: mx.Dtype | None = None, edited_precision: str | None = None
) -> tuple[dict[str, mx.array], tuple[list[EditReport], dict[str, dict[str, mx.array]]]]:
    plan = bind(model, plan)
    assert plan.writers is not None, "bind() finds the writers"
    params: dict[str, mx.array] = {}
    reports: list[EditReport] = []
    replaced: dict[str, dict] = {}
    for path, module in model.named_modules():
        if path not in plan.writers:
            continue
        leaves = _leaves(module)
        dense_dtype = None
        if storage_dtype is not None and _quant(module) is None:
            dense_dtype = storage_dtype
        edit = edit_module(path, leaves, plan, _quant(module), dense_dtype, edited_precision)
        if edit is None:
            continue
        tensors = edit.tensors
        if dense_dtype is not None:  # round to storage dtype, compute in the model's dtype
            tensors = {k: v.astype(module[k].dtype) for k, v in tensors.items()}
        if edit.dequantized:
            replaced[path] = tensors
        else:
            params.update({f"{path}.{k}": v for k, v in tensors.items()})
        reports.append(edit.report)
        mx.eval(list(tensors.values()))
    return params, (reports, replaced)


def apply_plan(
    model: nn.Module, plan: AblationPlan, storage_dtype: mx.Dtype | None = None, edited_precision: str | None = None
) -> list[EditReport]:
    """Edit ``model`` in place; returns one report per edited module."""
    params, (reports, replaced) = _edit_all(model, plan, storage_dtype, edited_precision)
    model.update(tree_unflatten(list(params.items())))
    if replaced:
        model.update_modules(tree_unflatten([(p, _dense_module(model, p, t)) for p, t in replaced.items()]))
    return reports


def _dense_module(model: nn.Module, path: str, tensors: dict[str, mx.array]) -> nn.Module:
    """The dense module that replaces the quantized one at ``path`` (``--edited-precision``)."""
    old = dict(model.named_modules())[path]
    weight = tensors["weight"].astype(mx.float32) if old["scales"].dtype == mx.float32 else tensors["weight"]
    new = dense_module(old, weight, tensors.get("bias"))
    if new is None:
        raise TypeError(f"{path}: no dense counterpart for {type(old).__name__}")
    return new
