"""Apply an ablation plan to a model in memory (``revertible_edit.TrialEditor`` also reverts it).

Uses the same per-module math as the streaming save (``orthogonalize.edit_module``),
so an in-memory edit equals the saved weights (up to the compute dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_abliteration.edit.orthogonalize import (
    DEFAULT_TARGETS,
    AblationPlan,
    EditReport,
    ModuleEdit,
    edit_module,
    select_writers,
    uniform_plan,
)
from mlx_abliteration.probe.capture import decoder_layers
from mlx_abliteration.probe.writer_discovery import model_writers
from mlx_abliteration.runtime.dense_twins import dense_module
from mlx_abliteration.runtime.quantization import QuantParams

EMBED_BLOCK_ELEMENTS = 1 << 24  # elements of an embedding edited at once (64 MB in float32)


def bind(model: nn.Module, plan: AblationPlan) -> AblationPlan:
    """``plan`` on the writers of ``model`` (found once per model) unless it already has its writers."""
    return plan if plan.writers is not None else plan.with_writers(model_writers(model))


def writer_modules(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[tuple[str, nn.Module]]:
    """(path, module) of every residual writer of ``model`` that ``targets`` selects."""
    chosen = select_writers(model_writers(model), targets)
    return [(path, module) for path, module in model.named_modules() if path in chosen]


def _leaves(module: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def storage_quant(module: nn.Module) -> QuantParams | None:
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
    return {
        f"{edit.path}.{k}": v
        for edit in _edits(model, plan, storage_dtype)
        if not edit.dequantized
        for k, v in edit.tensors.items()
    }


@dataclass
class _ModuleEdit:
    path: str
    module: nn.Module
    tensors: dict[str, mx.array]
    dequantized: bool
    report: EditReport


def _edits(
    model: nn.Module, plan: AblationPlan, storage_dtype: mx.Dtype | None = None, edited_precision: str | None = None
) -> Iterator[_ModuleEdit]:
    """Each edited writer's new arrays (evaluated), one module at a time."""
    plan = bind(model, plan)
    assert plan.writers is not None, "bind() finds the writers"
    for path, module in model.named_modules():
        if path not in plan.writers:
            continue
        quant = storage_quant(module)
        dense_dtype = storage_dtype if storage_dtype is not None and quant is None else None
        leaves = _leaves(module)
        if plan.writers[path].rows and quant is None and set(leaves) == {"weight"}:
            edit = _edit_rows_in_blocks(path, leaves["weight"], plan, dense_dtype)
        else:
            edit = edit_module(path, leaves, plan, quant, dense_dtype, edited_precision)
        if edit is None:
            continue
        tensors = edit.tensors
        if dense_dtype is not None:  # round to storage dtype, compute in the model's dtype
            tensors = {k: v.astype(module[k].dtype) for k, v in tensors.items()}
        mx.eval(list(tensors.values()))
        yield _ModuleEdit(path, module, tensors, edit.dequantized, edit.report)


def _edit_rows_in_blocks(
    path: str, table: mx.array, plan: AblationPlan, dense_dtype: mx.Dtype | None
) -> ModuleEdit | None:
    """A dense embedding's edit, ``EMBED_BLOCK_ELEMENTS`` at a time (it is row by row, so the result is the same).

    Whole, its float32 temporaries were ~3x the table (2.8 GB for Qwen2.5-1.5B's
    151936 x 1536): the peak of a run's memory.
    """
    step = max(1, EMBED_BLOCK_ELEMENTS // table.shape[-1])
    out, edit = None, None
    before = after = 0.0
    for start in range(0, table.shape[0], step):
        edit = edit_module(path, {"weight": table[start : start + step]}, plan, None, dense_dtype)
        if edit is None:
            return None
        block = edit.tensors["weight"]
        if out is None:
            out = mx.zeros(table.shape, block.dtype)
        out[start : start + step] = block
        mx.eval(out)
        before, after = before + edit.report.before**2, after + edit.report.after**2
    assert edit is not None and out is not None, "an embedding has rows"
    report = replace(edit.report, before=math.sqrt(before), after=math.sqrt(after))
    return ModuleEdit({"weight": out}, report)


def apply_plan(
    model: nn.Module, plan: AblationPlan, storage_dtype: mx.Dtype | None = None, edited_precision: str | None = None
) -> list[EditReport]:
    """Edit ``model`` in place; returns one report per edited module.

    Each module's edit replaces its arrays before the next one is computed,
    so the originals are released as it goes (not one copy of every writer
    at once: +2.7 GB for a 1.5B model in float32).
    """
    reports = []
    for edit in _edits(model, plan, storage_dtype, edited_precision):
        if edit.dequantized:
            model.update_modules(tree_unflatten([(edit.path, _dense_module(edit.path, edit.module, edit.tensors))]))
        else:
            edit.module.update(tree_unflatten(list(edit.tensors.items())))
        reports.append(edit.report)
    return reports


def _dense_module(path: str, old: nn.Module, tensors: dict[str, mx.array]) -> nn.Module:
    """The dense module that replaces the quantized one ``old`` at ``path`` (``--edited-precision``)."""
    weight = tensors["weight"].astype(mx.float32) if old["scales"].dtype == mx.float32 else tensors["weight"]
    new = dense_module(old, weight, tensors.get("bias"))
    if new is None:
        raise TypeError(f"{path}: no dense counterpart for {type(old).__name__}")
    return new
