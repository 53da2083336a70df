"""Orthogonalize every matrix that writes into the residual stream.

Writers map into residual space; MLX stores ``Linear.weight`` as (out, in),
so for a writer the residual axis is ``-2`` (also per expert for 3-D MoE
``SwitchLinear`` weights), and for the token embedding (vocab, hidden) it is
``-1``. The side is decided by the module's role, never by shape:

    writer     W' = W - s r (r^T W)        bias  b' = b - s r (r^T b)
    embedding  E' = E - s (E r) r^T

q/k/v/up/gate projections read the residual stream and are never edited.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import mlx.core as mx

from ..defaults import DEFAULT_TARGETS, WRITER_ROLES
from ..errors import UserError
from .utils import layer_index

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

    def strength(self, role: str, layer: int | None) -> float:
        values = self.strengths.get(role)
        if not values:
            return 0.0
        if role == "embed" or layer is None:
            return float(values[0])
        return float(values[layer]) if layer < len(values) else 0.0

    def direction(self, role: str, layer: int | None) -> mx.array:
        if role == "embed" or layer is None:
            return self.embed_direction
        return self.layer_directions[layer]

    def to_dict(self) -> dict:
        return {"strengths": self.strengths, "targets": list(self.targets), "norm_preserve": self.norm_preserve}


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


def check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"ablation strength {strength!r} is not a number; use e.g. 1.0") from None
    if value != value or value < 0 or value == float("inf"):
        raise UserError(f"ablation strength {strength!r} must be a finite number >= 0 (1.0 removes the direction)")
    return value


def unit(v: mx.array) -> mx.array:
    v = v.astype(mx.float32)
    return v / mx.linalg.norm(v)


def writer_role(module_path: str, targets: Iterable[str] = DEFAULT_TARGETS) -> str | None:
    """Role of a module path if it is a targeted residual writer, else None."""
    for suffix in targets:
        if module_path == suffix or module_path.endswith("." + suffix):
            role = WRITER_ROLES.get(suffix)
            if role is None:
                raise UserError(f"unknown ablation target {suffix!r}; known targets: {', '.join(WRITER_ROLES)}")
            return role
    return None


# --- the math, on float32 arrays -------------------------------------------------


def orthogonalize_writer(w: mx.array, r: mx.array, s: float, norm_preserve: bool = False) -> mx.array:
    """W' = W - s r (r^T W) along axis -2 (works per expert for [E, H, in])."""
    r = r.astype(mx.float32)
    proj = mx.matmul(r[None, :], w)  # [..., 1, in]  = r^T W
    edited = w - s * r[:, None] * proj
    if norm_preserve:
        edited = edited * _norm_ratio(w, edited, axis=-2)
    return edited


def orthogonalize_embedding(e: mx.array, r: mx.array, s: float, norm_preserve: bool = False) -> mx.array:
    """E' = E - s (E r) r^T: each token's embedding row loses its r component."""
    r = r.astype(mx.float32)
    edited = e - s * mx.matmul(e, r)[:, None] * r[None, :]
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


def refusal_component(w: mx.array, r: mx.array, role: str) -> float:
    """||r^T W|| for writers, ||E r|| for embeddings."""
    r = r.astype(mx.float32)
    if role == "embed":
        return float(mx.linalg.norm(mx.matmul(w, r)).item())
    return float(mx.linalg.norm(mx.matmul(r[None, :], w)).item())


# --- module-level edit: dense or quantized -----------------------------------


@dataclass(frozen=True)
class QuantParams:
    group_size: int
    bits: int
    mode: str = "affine"
    scales_dtype: object = None  # stored dtype of scales/biases, for dense twins


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


def dequantize_leaves(leaves: dict[str, mx.array], quant: QuantParams) -> mx.array:
    return mx.dequantize(
        leaves["weight"], leaves["scales"], leaves.get("biases"), group_size=quant.group_size, bits=quant.bits, mode=quant.mode
    ).astype(mx.float32)


def quantize_weight(w: mx.array, quant: QuantParams, scales_dtype=None) -> dict[str, mx.array]:
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


def touches(plan: AblationPlan, module_path: str) -> bool:
    """Whether ``plan`` edits the module at ``module_path`` (cheap, no arrays)."""
    role = writer_role(module_path, plan.targets)
    return role is not None and plan.strength(role, layer_index(module_path)) != 0.0


def edit_module(
    module_path: str,
    leaves: dict[str, mx.array],
    plan: AblationPlan,
    quant: QuantParams | None = None,
    dense_dtype=None,
    edited_precision: str | None = None,
) -> ModuleEdit | None:
    """Edit one writer's tensors (``weight`` [+ ``scales``/``biases``] [+ ``bias``]).

    Returns None when the module is not a target or its strength is 0.
    ``dense_dtype`` rounds dense results to the stored dtype (so an in-memory
    float32 copy matches the saved bf16 weights); ``edited_precision`` (e.g.
    "bfloat16") stores an edited quantized matrix unquantized instead of
    requantizing it.
    """
    role = writer_role(module_path, plan.targets)
    if role is None:
        return None
    layer = layer_index(module_path)
    strength = plan.strength(role, layer)
    if strength == 0.0:
        return None
    r = plan.direction(role, layer)
    packed = quant is not None and "scales" in leaves
    # A dense in-memory twin of a quantized matrix (see dense_compute): edit it
    # as the saved file will be, requantized, but keep it dense.
    dense_twin = quant is not None and not packed
    w = dequantize_leaves(leaves, quant) if packed else leaves["weight"].astype(mx.float32)
    _check_shape(module_path, role, w, r)
    before = refusal_component(w, r, role)
    if role == "embed":
        edited = orthogonalize_embedding(w, r, strength, plan.norm_preserve)
    else:
        edited = orthogonalize_writer(w, r, strength, plan.norm_preserve)
    out: dict[str, mx.array] = {}
    dequantized = False
    keep = edited_precision in (None, "keep")
    if dense_twin:
        stored = dequantize_leaves(quantize_weight(edited, quant, quant.scales_dtype), quant) if keep else edited.astype(_dtype(edited_precision)).astype(mx.float32)
        out["weight"] = stored.astype(leaves["weight"].dtype)
    elif packed and keep:
        out.update(quantize_weight(edited, quant, leaves["scales"].dtype))
        stored = dequantize_leaves(out, quant)
    else:
        dtype = _dtype(edited_precision) if packed else (dense_dtype or leaves["weight"].dtype)
        out["weight"] = edited.astype(dtype)
        stored = out["weight"].astype(mx.float32)
        dequantized = packed
    if "bias" in leaves and role != "embed":
        bias = leaves["bias"]
        out["bias"] = orthogonalize_bias(bias.astype(mx.float32), r, strength).astype(dense_dtype or bias.dtype)
    after = refusal_component(stored, r, role)
    report = EditReport(module_path, role, layer, strength, quant is not None, before, after)
    return ModuleEdit(out, report, dequantized)


def _dtype(name: str):
    try:
        return {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[name]
    except KeyError:
        raise UserError(f"--edited-precision {name!r}: choose keep, float16, bfloat16 or float32") from None


def _check_shape(path: str, role: str, w: mx.array, r: mx.array) -> None:
    axis = -1 if role == "embed" else -2
    if w.ndim < 2 or w.shape[axis] != r.shape[-1]:
        raise UserError(
            f"{path} has shape {tuple(w.shape)} but the refusal direction has size {r.shape[-1]}; "
            "the direction does not belong to this model"
        )
