"""The search space: the numbers a trial samples and the PlanSpec they make.

Search space (L = number of layers; ranges widen to include the warm-start
trials if they lie outside). Centred on what is known to work: full-depth
ablation from a direction in the middle of the network (Arditi et al.: below
0.8·L), with room to taper it (Heretic-style kernels), to leave the embedding
alone, and to preserve norms (grimjim's MPOA):

==============================  ===========================================
parameter                       range
==============================  ===========================================
direction_scope                 global | per-layer
direction_index                 0.3·(L−1) .. 0.8·(L−1), float (interpolated)
{attn,mlp}.max_weight           0.8 .. 1.5
{attn,mlp}.max_weight_position  0.3·(L−1) .. 0.9·(L−1)
{attn,mlp}.min_weight_fraction  0 .. 1   (min_weight = fraction · max_weight)
{attn,mlp}.min_weight_distance  0.2·(L−1) .. L−1
embed_weight                    0 .. 1   (only when the embedding is a target)
norm_preserve                   false | true   (only true with --norm-preserve)
components                      both | attn | mlp   (attn: the MLP's strength is 0, and vice versa)
==============================  ===========================================

``components`` lets a trial edit the attention output alone or the MLP output alone (independent
comparisons found attention-only edits kept capability best); the zeroed component's kernel is still
sampled (no conditional space) and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from mlx_abliteration.edit.strength_schedule import COMPONENTS, DIRECTION_SCOPES, Kernel, PlanSpec

if TYPE_CHECKING:
    from optuna.trial import Trial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


SPACE_VERSION = 3  # part of a study's identity: a changed space starts a new study (3: components)
COMPONENT_CHOICES = ("both", "attn", "mlp")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of every sampled parameter (absolute layers for positions)."""

    direction_index: tuple[float, float]
    max_weight: tuple[float, float]
    max_weight_position: tuple[float, float]
    min_weight_distance: tuple[float, float]
    embed_weight: tuple[float, float] | None  # None: the embedding is not edited
    norm_preserve: tuple[bool, ...] = (False, True)
    components: tuple[str, ...] = COMPONENT_CHOICES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        fields: dict[str, Any] = {k: (tuple(v) if v is not None else None) for k, v in data.items()}
        return cls(**fields)


def search_space(
    num_layers: int,
    probed_layers: Sequence[int],
    edit_embedding: bool,
    warm: Sequence[PlanSpec] = (),
    norm_preserve: bool = False,
) -> SearchSpace:
    last = float(max(num_layers - 1, 1))
    lo, hi = float(min(probed_layers)), float(max(probed_layers))
    index = (max(lo, 0.3 * last), min(hi, 0.8 * last))
    if index[0] > index[1]:  # too few probed layers for the usual band: any probed layer
        index = (lo, hi)
    space = SearchSpace(
        index,
        (0.8, 1.5),
        (0.3 * last, 0.9 * last),
        (0.2 * last, last),
        (0.0, 1.0) if edit_embedding else None,
        (True,) if norm_preserve else (False, True),
    )
    for spec in warm:
        space = _widened(space, spec)
    return space


def _widened(space: SearchSpace, warm: PlanSpec) -> SearchSpace:
    def cover(bounds: tuple[float, float], *values: float) -> tuple[float, float]:
        return (min(bounds[0], *values), max(bounds[1], *values))

    kernels = (warm.attn, warm.mlp)
    embed = cover(space.embed_weight, warm.embed_weight) if space.embed_weight is not None else None
    return SearchSpace(
        cover(space.direction_index, warm.direction_index),
        cover(space.max_weight, *(k.max_weight for k in kernels)),
        cover(space.max_weight_position, *(k.max_weight_position for k in kernels)),
        cover(space.min_weight_distance, *(k.min_weight_distance for k in kernels)),
        embed,
        space.norm_preserve,
    )


def suggest_spec(trial: Trial, space: SearchSpace) -> PlanSpec:
    """Sample a ``PlanSpec`` from an Optuna trial (every parameter, always: no conditional space)."""
    scope = trial.suggest_categorical("direction_scope", list(DIRECTION_SCOPES))
    index = trial.suggest_float("direction_index", *space.direction_index)
    kernels = {c: _suggest_kernel(trial, c, space) for c in COMPONENTS}
    embed = trial.suggest_float("embed_weight", *space.embed_weight) if space.embed_weight is not None else 0.0
    norm_preserve = trial.suggest_categorical("norm_preserve", list(space.norm_preserve))
    components = trial.suggest_categorical("components", list(space.components))
    for component in COMPONENTS:
        if components not in ("both", component):
            kernels[component] = replace(kernels[component], max_weight=0.0, min_weight=0.0)
    return PlanSpec(scope, index, kernels["attn"], kernels["mlp"], embed, norm_preserve)


def _suggest_kernel(trial: Trial, component: str, space: SearchSpace) -> Kernel:
    peak = trial.suggest_float(f"{component}.max_weight", *space.max_weight)
    position = trial.suggest_float(f"{component}.max_weight_position", *space.max_weight_position)
    fraction = trial.suggest_float(f"{component}.min_weight_fraction", 0.0, 1.0)
    distance = trial.suggest_float(f"{component}.min_weight_distance", *space.min_weight_distance)
    return Kernel(peak, position, fraction * peak, distance)


def spec_params(spec: PlanSpec, space: SearchSpace) -> dict:
    """The Optuna parameters that ``suggest_spec`` turns into ``spec`` (to enqueue it)."""
    params: dict = {"direction_scope": spec.direction_scope, "direction_index": spec.direction_index}
    edited = [c for c in COMPONENTS if getattr(spec, c).max_weight > 0]
    params["components"] = "both" if len(edited) != 1 else edited[0]
    for component in COMPONENTS:
        kernel: Kernel = getattr(spec, component)
        if component not in edited and edited:  # a zeroed component: any in-range values, ignored
            kernel = replace(kernel, max_weight=space.max_weight[0], min_weight=0.0)
        params[f"{component}.max_weight"] = kernel.max_weight
        params[f"{component}.max_weight_position"] = kernel.max_weight_position
        params[f"{component}.min_weight_fraction"] = kernel.min_weight / kernel.max_weight if kernel.max_weight else 0.0
        params[f"{component}.min_weight_distance"] = kernel.min_weight_distance
    if space.embed_weight is not None:
        params["embed_weight"] = spec.embed_weight
    params["norm_preserve"] = spec.norm_preserve
    return params
