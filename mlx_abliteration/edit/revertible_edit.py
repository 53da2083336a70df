"""Apply ablation plans to a loaded model and revert them exactly, at a small memory cost.

A search (and ``--use-layer auto``) edits the same model over and over.
Keeping every original writer alive beside its edited copy would cost +2.7 GB
for a 1.5B model in float32, plus ~2.5x the embedding while it is edited.
``TrialEditor``, the one apply-and-revert mechanism, instead

- keeps the originals compact: in the checkpoint's dtype when the in-memory
  float32 values round-trip through it exactly (they do for a bf16 or fp16
  checkpoint), else as they are;
- applies a plan one layer at a time, so each layer's float32 originals are
  released as soon as their edits replace them, and the embedding in row
  blocks (its edit is row by row).

``restore`` puts back every edited array bit for bit, and the original module
objects where ``--edited-precision`` replaced quantized modules by dense ones.
The edits themselves are ``apply_plan``'s, so they round exactly as there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_abliteration.edit.in_memory import EMBED_BLOCK_ELEMENTS, apply_plan, writer_modules
from mlx_abliteration.edit.orthogonalize import AblationPlan
from mlx_abliteration.probe.writer_discovery import model_writers
from mlx_abliteration.runtime.mx_types import flat_params


def compact(value: mx.array, storage_dtype: mx.Dtype | None) -> mx.array:
    """``value`` in ``storage_dtype`` if that holds it exactly, else ``value`` itself."""
    if storage_dtype is None or value.dtype != mx.float32 or storage_dtype == mx.float32:
        return value
    small = value.astype(storage_dtype)
    return small if mx.array_equal(small.astype(mx.float32), value).item() else value


def plan_parts(plan: AblationPlan) -> Iterator[AblationPlan]:
    """The plan split into its embedding edit and one edit per layer (same per-module strengths)."""
    attn, mlp = plan.strengths.get("attn") or [], plan.strengths.get("mlp") or []
    embed = plan.strengths.get("embed") or [0.0]
    num_layers = max(len(attn), len(mlp))
    zeros = [0.0] * num_layers
    if embed[0]:
        yield replace(plan, strengths={"attn": zeros, "mlp": zeros, "embed": list(embed)})
    for layer in range(num_layers):
        a = attn[layer] if layer < len(attn) else 0.0
        m = mlp[layer] if layer < len(mlp) else 0.0
        if a or m:
            yield replace(
                plan, strengths={"attn": _only(zeros, layer, a), "mlp": _only(zeros, layer, m), "embed": [0.0]}
            )


def _only(zeros: list[float], layer: int, value: float) -> list[float]:
    out = list(zeros)
    out[layer] = value
    return out


class TrialEditor:
    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[str],
        storage_dtype: mx.Dtype | None = None,
        edited_precision: str | None = None,
    ) -> None:
        self.model = model
        self.targets = tuple(targets)
        self.storage_dtype, self.edited_precision = storage_dtype, edited_precision
        self.modules = writer_modules(model, self.targets)
        self.originals = [
            (path, f"{path}.{name}", value.dtype, compact(value, storage_dtype))
            for path, module in self.modules
            for name, value in flat_params(module.parameters())
        ]
        mx.eval([v for *_, v in self.originals])
        self.touched: set[str] = set()

    def apply(self, plan: AblationPlan) -> None:
        for part in plan_parts(plan):
            if part.strengths["embed"][0]:
                self._apply_embedding(part)
            else:
                self._apply(part)

    def _apply(self, part: AblationPlan) -> None:
        reports = apply_plan(self.model, part, storage_dtype=self.storage_dtype, edited_precision=self.edited_precision)
        self.touched.update(r.module for r in reports)

    def _apply_embedding(self, part: AblationPlan) -> None:
        step = max(1, EMBED_BLOCK_ELEMENTS // part.embed_direction.shape[-1])
        roles = model_writers(self.model)
        embeds = [(p, m) for p, m in writer_modules(self.model, part.targets) if roles[p].role == "embed"]
        if len(embeds) != 1 or not self._blockwise(embeds[0][1], step):
            self._apply(part)
            return
        path, module = embeds[0]
        # Blocks are cut from the kept originals, so the module's full-size
        # array is released at the first block; each edited block is written
        # into one output array (in place: MLX donates the buffer).
        originals = {name[len(path) + 1 :]: (dtype, kept) for p, name, dtype, kept in self.originals if p == path}
        rows = module["weight"].shape[0]
        out: dict[str, mx.array] = {}
        for start in range(0, rows, step):
            module.update(
                tree_unflatten(
                    [(k, kept[start : start + step].astype(dtype)) for k, (dtype, kept) in originals.items()]
                )
            )
            self._apply(part)
            for k in originals:
                if k not in out:
                    out[k] = mx.zeros((rows, *module[k].shape[1:]), module[k].dtype)
                out[k][start : start + step] = module[k]
            mx.eval(list(out.values()))
        module.update(tree_unflatten(list(out.items())))

    def _blockwise(self, module: nn.Module, step: int) -> bool:
        # A packed embedding stored dense (--edited-precision) is replaced by a new module: edit it whole.
        packed_to_dense = "scales" in module and self.edited_precision not in (None, "keep")
        return module["weight"].shape[0] > step and not packed_to_dense

    def restore(self) -> None:
        if not self.touched:
            return
        touched, self.touched = self.touched, set()
        self.model.update_modules(tree_unflatten([(p, m) for p, m in self.modules if p in touched]))
        restored = [
            (name, v if v.dtype == dtype else v.astype(dtype))
            for path, name, dtype, v in self.originals
            if path in touched
        ]
        self.model.update(tree_unflatten(restored))
        mx.eval([v for _, v in restored])
