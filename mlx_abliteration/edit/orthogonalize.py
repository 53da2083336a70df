"""Orthogonalize every matrix that writes into the residual stream.

Writers map into residual space; MLX stores ``Linear.weight`` as (out, in),
so for a writer the residual axis is ``-2`` (also per expert for 3-D MoE
``SwitchLinear`` weights), and for the token embedding (vocab, hidden) it is
``-1``. The side is decided by the module's role, never by shape:

    writer     W' = W - s r (r^T W)        bias  b' = b - s r (r^T b)
    embedding  E' = E - s (E r) r^T

Which modules are writers is found from the model itself (``writers``); a
post-norm writer is edited against ``u = g * r / |g * r|`` instead of r.
q/k/v/up/gate projections read the residual stream and are never edited.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import mlx.core as mx

from mlx_abliteration.config.defaults import DEFAULT_TARGETS, check_strength
from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.writers import Writer, WriterMap
from mlx_abliteration.runtime.mx_types import scalar
from mlx_abliteration.runtime.quantization import QuantParams, dequantize_leaves, quantize_weight

QUANT_LEAVES = ("weight", "scales", "biases")


@dataclass
class AblationPlan:
    """Which direction and strength each residual writer gets.

    ``layer_directions`` holds one unit direction per model layer [L, H]
    (the same row repeated for a single global direction); ``strengths`` maps
    a role ("attn", "mlp") to per-layer strengths and "embed" to one value.
    """

    layer_directions: mx.array
    embed_direction: mx.array
    strengths: dict[str, list[float]]
    targets: tuple[str, ...] = DEFAULT_TARGETS
    norm_preserve: bool = False
    writers: WriterMap | None = None  # found on the model (core.writers); None: found where the plan is applied

    def with_writers(self, writers: WriterMap) -> AblationPlan:
        """This plan on ``writers`` (checked against ``targets``)."""
        return replace(self, writers=select_writers(writers, self.targets))

    def writer(self, module_path: str) -> Writer | None:
        """The writer at ``module_path`` if this plan edits it (strength != 0), else None."""
        if self.writers is None:
            raise ValueError("the plan has no writers yet: bind it to a model with with_writers()")
        writer = self.writers.get(module_path)
        if writer is None or self.strength(writer.role, writer.layer) == 0.0:
            return None
        return writer

    def strength(self, role: str, layer: int | None) -> float:
        values = self.strengths.get(role)
        if not values:
            return 0.0
        if role == "embed" or layer is None:
            return float(values[0])
        return float(values[layer]) if layer < len(values) else 0.0

    def direction(self, writer: Writer) -> mx.array:
        """The unit vector ``writer`` is orthogonalized against."""
        if writer.role == "embed" or writer.layer is None:
            return writer.direction(self.embed_direction)
        return writer.direction(self.layer_directions[writer.layer])

    def to_dict(self) -> dict:
        out = {"strengths": self.strengths, "targets": list(self.targets), "norm_preserve": self.norm_preserve}
        if self.writers is not None:
            out["writers"] = {path: w.to_dict() for path, w in self.writers.items()}
        return out


def select_writers(writers: WriterMap, targets: Iterable[str]) -> WriterMap:
    """The writers whose path ends with one of ``targets`` (all of them when ``targets`` is empty).

    A target that names no writer is an error: it is a typo or a reader.
    """
    targets = tuple(targets or ())
    if not targets:
        return dict(writers)
    chosen = {}
    for target in targets:
        if not isinstance(target, str) or not target.strip(".").strip():
            raise UserError(f"--targets: {target!r} is not a module name")
        hits = {p: w for p, w in writers.items() if p == target or p.endswith("." + target)}
        if not hits:
            names = sorted({_short_name(p) for p in writers})
            raise UserError(
                f"--targets {target}: no residual writer of this model is named so; its writers are {', '.join(names)}"
            )
        chosen.update(hits)
    return chosen


def _short_name(path: str) -> str:
    # model.layers.3.self_attn.o_proj -> self_attn.o_proj; model.embed_tokens -> embed_tokens

    match = re.search(r"\.\d+\.(.+)$", path)
    return match.group(1) if match else path.rpartition(".")[2]


def uniform_plan(
    direction: mx.array,
    num_layers: int,
    strength: float = 1.0,
    ablate_layers: Iterable[int] | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    norm_preserve: bool = False,
) -> AblationPlan:
    """One global direction, one strength, on ``ablate_layers`` (default all)."""
    check_strength(strength)
    direction = unit(direction)
    chosen = set(range(num_layers) if ablate_layers is None else ablate_layers)
    per_layer = [strength if i in chosen else 0.0 for i in range(num_layers)]
    return AblationPlan(
        layer_directions=mx.broadcast_to(direction, (num_layers, direction.shape[-1])),
        embed_direction=direction,
        strengths={"attn": per_layer, "mlp": list(per_layer), "embed": [strength]},
        targets=tuple(targets),
        norm_preserve=norm_preserve,
    )


def unit(v: mx.array) -> mx.array:
    v = v.astype(mx.float32)
    return v / mx.linalg.norm(v)


# --- the math, on float32 arrays -------------------------------------------------


def orthogonalize_writer(w: mx.array, r: mx.array, s: float, norm_preserve: bool = False) -> mx.array:
    """W' = W - s r (r^T W) along axis -2 (works per expert for [E, H, in])."""
    r = r.astype(mx.float32)
    proj = mx.matmul(r[None, :], w)  # [..., 1, in]  = r^T W
    edited = w - s * r[:, None] * proj
    if norm_preserve:
        edited = edited * _norm_ratio(w, edited, axis=-2)
    return edited


EMBED_DOT_ROWS = 4096  # rows per elementwise dot product (bounds the float32 temporary)


def row_dots(e: mx.array, r: mx.array) -> mx.array:
    """E r, one row at a time: each row's sum is the same however many rows are edited together.

    A BLAS matrix-vector product picks its kernel (and so its rounding) by
    the number of rows, so an embedding edited in blocks would differ from one
    edited whole; elementwise products reduced per row do not.
    """
    return mx.concatenate([(e[i : i + EMBED_DOT_ROWS] * r).sum(-1) for i in range(0, e.shape[0], EMBED_DOT_ROWS)])


def orthogonalize_embedding(e: mx.array, r: mx.array, s: float, norm_preserve: bool = False) -> mx.array:
    """E' = E - s (E r) r^T: each token's embedding row loses its r component."""
    r = r.astype(mx.float32)
    edited = e - s * row_dots(e, r)[:, None] * r[None, :]
    if norm_preserve:
        edited = edited * _norm_ratio(e, edited, axis=-1)
    return edited


def orthogonalize_bias(b: mx.array, r: mx.array, s: float) -> mx.array:
    r = r.astype(mx.float32)
    return b - s * (b * r).sum(-1, keepdims=True) * r


def _norm_ratio(before: mx.array, after: mx.array, axis: int) -> mx.array:
    # Magnitude-preserving ablation (after grimjim's MPOA): each written
    # vector keeps its norm, only its direction changes.
    old = mx.linalg.norm(before, axis=axis, keepdims=True)
    new = mx.linalg.norm(after, axis=axis, keepdims=True)
    return old / mx.maximum(new, 1e-12)


def refusal_component(w: mx.array, r: mx.array, rows: bool) -> float:
    """||r^T W|| for linear writers, ||E r|| for embedding tables (``rows``)."""
    r = r.astype(mx.float32)
    if rows:
        return scalar(mx.linalg.norm(mx.matmul(w, r)))
    return scalar(mx.linalg.norm(mx.matmul(r[None, :], w)))


# --- module-level edit: dense or quantized -----------------------------------


@dataclass
class EditReport:
    """What an edit did to one module (for the log and the precision warning)."""

    module: str
    role: str
    layer: int | None
    strength: float
    quantized: bool
    before: float  # refusal component before the edit
    after: float  # after the edit, as stored (after requantization if any)

    @property
    def residual(self) -> float:
        return self.after / self.before if self.before > 0 else 0.0


@dataclass
class ModuleEdit:
    tensors: dict[str, mx.array]
    report: EditReport
    dequantized: bool = False
    extra: dict = field(default_factory=dict)


def touches(plan: AblationPlan, module_path: str) -> bool:
    """Whether ``plan`` edits the module at ``module_path`` (cheap, no arrays)."""
    return plan.writer(module_path) is not None


def edit_module(
    module_path: str,
    leaves: dict[str, mx.array],
    plan: AblationPlan,
    quant: QuantParams | None = None,
    dense_dtype: mx.Dtype | None = None,
    edited_precision: str | None = None,
) -> ModuleEdit | None:
    """Edit one writer's tensors (``weight`` [+ ``scales``/``biases``] [+ ``bias``]).

    Returns None when the module is not a target or its strength is 0.
    ``dense_dtype`` rounds dense results to the stored dtype (so an in-memory
    float32 copy matches the saved bf16 weights); ``edited_precision`` (e.g.
    "bfloat16") stores an edited quantized matrix unquantized instead of
    requantizing it.
    """
    writer = plan.writer(module_path)
    if writer is None:
        return None
    role, layer = writer.role, writer.layer
    strength = plan.strength(role, layer)
    r = plan.direction(writer)
    packed = quant is not None and "scales" in leaves
    # A dense in-memory twin of a quantized matrix (see dense_twins): edit it
    # as the saved file will be, requantized, but keep it dense.
    dense_twin = quant is not None and not packed
    w = dequantize_leaves(leaves, quant) if quant is not None and packed else leaves["weight"].astype(mx.float32)
    check_shape(module_path, writer.rows, w, r)
    before = refusal_component(w, r, writer.rows)
    if writer.rows:
        edited = orthogonalize_embedding(w, r, strength, plan.norm_preserve)
    else:
        edited = orthogonalize_writer(w, r, strength, plan.norm_preserve)
    out: dict[str, mx.array] = {}
    dequantized = False
    # None: requantize an edited quantized matrix; else the dtype it is stored in unquantized.
    precision = None if edited_precision in (None, "keep") else edited_precision
    if quant is not None and dense_twin:
        stored = (
            dequantize_leaves(quantize_weight(edited, quant, quant.scales_dtype), quant)
            if precision is None
            else edited.astype(_dtype(precision)).astype(mx.float32)
        )
        out["weight"] = stored.astype(leaves["weight"].dtype)
    elif quant is not None and packed and precision is None:
        out.update(quantize_weight(edited, quant, leaves["scales"].dtype))
        stored = dequantize_leaves(out, quant)
    else:
        dtype = _dtype(precision) if packed and precision is not None else (dense_dtype or leaves["weight"].dtype)
        out["weight"] = edited.astype(dtype)
        stored = out["weight"].astype(mx.float32)
        dequantized = packed
    if "bias" in leaves and not writer.rows:
        bias = leaves["bias"]
        out["bias"] = orthogonalize_bias(bias.astype(mx.float32), r, strength).astype(dense_dtype or bias.dtype)
    after = refusal_component(stored, r, writer.rows)
    check_finite(module_path, after, out, strength)
    report = EditReport(module_path, role, layer, strength, quant is not None, before, after)
    return ModuleEdit(out, report, dequantized)


def _dtype(name: str) -> mx.Dtype:
    try:
        return {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[name]
    except KeyError:
        raise UserError(f"--edited-precision {name!r}: choose keep, float16, bfloat16 or float32") from None


def check_finite(path: str, after: float, tensors: dict[str, mx.array], strength: float) -> None:
    """Non-finite stored weights are an error (never saved).

    ``after`` = |r^T W'| (|E' r| for tables) is NaN or inf as soon as one
    stored element is, so the matrix needs no separate full pass (isfinite
    over an embedding costs seconds on the CPU); a bias is checked directly.
    """
    bias = tensors.get("bias")
    if math.isfinite(after) and (bias is None or bool(mx.all(mx.isfinite(bias)).item())):
        return
    raise UserError(
        f"editing {path} gave non-finite weights (strength {strength:g}); "
        "the source weights or the direction hold inf/NaN, or the strength is too large"
    )


def check_shape(path: str, rows: bool, w: mx.array, r: mx.array) -> None:
    axis = -1 if rows else -2
    if w.ndim < 2 or w.shape[axis] != r.shape[-1]:
        raise UserError(
            f"{path} has shape {tuple(w.shape)} but the refusal direction has size {r.shape[-1]}; "
            "the direction does not belong to this model"
        )


def check_edits(plan: AblationPlan, reports: list[EditReport]) -> None:
    """The plan's success condition: every writer it gives a strength was edited, and something was."""
    if not reports:
        raise UserError(
            "the plan edits no module (every strength is 0 or --targets matched nothing); nothing was saved"
        )
    edited = {r.module for r in reports}
    missing = sorted(path for path in plan.writers or {} if plan.writer(path) is not None and path not in edited)
    if missing:
        raise UserError(
            f"{len(missing)} residual writer(s) were not found in the weights, e.g. {missing[0]}; nothing was saved"
        )
