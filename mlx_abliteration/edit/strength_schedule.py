"""Heretic-style ablation plans: a direction choice plus a strength kernel over layers.

A ``PlanSpec`` is a handful of numbers (what the search tunes and what the
log records); ``kernel_plan`` turns it into an ``AblationPlan`` for a model.

Direction: ``global`` uses one direction, interpolated at the fractional
layer ``direction_index`` (``RefusalDirections.direction``), for every
writer; ``per-layer`` gives each layer's writers that layer's own direction.
The embedding always uses the direction at ``direction_index``.

Kernel (one per component, attention out and MLP out): the strength at layer
``l`` falls linearly from ``max_weight`` at ``max_weight_position`` to
``min_weight`` at distance ``min_weight_distance``, and is 0 beyond it::

    d = |l - max_weight_position|
    w(l) = max_weight + (min_weight - max_weight) * d / min_weight_distance   if d <= min_weight_distance
    w(l) = 0                                                                   otherwise

``min_weight == max_weight`` with a distance spanning every layer is the
fixed, uniform plan of ``mlx-abliterate run``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from mlx_abliteration.config.defaults import DEFAULT_TARGETS
from mlx_abliteration.edit.orthogonalize import AblationPlan, unit
from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.directions import RefusalDirections

DIRECTION_SCOPES = ("global", "per-layer")
COMPONENTS = ("attn", "mlp")


@dataclass(frozen=True)
class Kernel:
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weights(self, num_layers: int) -> list[float]:
        """Strength of each layer 0..num_layers-1."""
        return [self.weight(layer) for layer in range(num_layers)]

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        return self.max_weight + (self.min_weight - self.max_weight) * distance / self.min_weight_distance


@dataclass(frozen=True)
class PlanSpec:
    direction_scope: str
    direction_index: float
    attn: Kernel
    mlp: Kernel
    embed_weight: float = 0.0
    norm_preserve: bool = False  # magnitude-preserving ablation (MPOA-style), as `run --norm-preserve`

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PlanSpec:
        try:
            spec = cls(
                direction_scope=str(data["direction_scope"]),
                direction_index=float(data["direction_index"]),
                attn=Kernel(**{k: float(v) for k, v in data["attn"].items()}),
                mlp=Kernel(**{k: float(v) for k, v in data["mlp"].items()}),
                embed_weight=float(data.get("embed_weight", 0.0)),
                norm_preserve=_flag(data.get("norm_preserve", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(
                f"not a plan spec ({type(err).__name__}: {err}); expected the keys of PlanSpec.to_dict()"
            ) from None
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.direction_scope not in DIRECTION_SCOPES:
            raise UserError(f"direction_scope {self.direction_scope!r}: choose one of {', '.join(DIRECTION_SCOPES)}")
        for name, kernel in (("attn", self.attn), ("mlp", self.mlp)):
            if kernel.min_weight_distance <= 0:
                raise UserError(f"{name}.min_weight_distance must be > 0 (got {kernel.min_weight_distance})")
            if min(kernel.max_weight, kernel.min_weight) < 0:
                raise UserError(f"{name} kernel weights must be >= 0")
        if self.embed_weight < 0:
            raise UserError("embed_weight must be >= 0")


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"norm_preserve must be true or false, not {value!r}")
    return value


def uniform_spec(
    layer: float, num_layers: int, strength: float = 1.0, embed: bool = True, norm_preserve: bool = False
) -> PlanSpec:
    """The spec of the fixed plan: one direction, ``strength`` on every layer (and the embedding)."""
    center = (num_layers - 1) / 2
    kernel = Kernel(strength, center, strength, max(float(num_layers - 1), 1.0))
    return PlanSpec("global", float(layer), kernel, kernel, strength if embed else 0.0, norm_preserve)


def kernel_plan(
    directions: RefusalDirections, spec: PlanSpec, targets: Sequence[str] = DEFAULT_TARGETS
) -> AblationPlan:
    """The ``AblationPlan`` that ``spec`` describes for the model ``directions`` were probed on."""
    spec.validate()
    num_layers = directions.num_model_layers
    embed_direction = unit(directions.direction(spec.direction_index))
    if spec.direction_scope == "global":
        layer_directions = mx.broadcast_to(embed_direction, (num_layers, embed_direction.shape[-1]))
    else:
        layer_directions = mx.stack(
            [unit(directions.direction(directions.nearest_probed(layer))) for layer in range(num_layers)]
        )
    return AblationPlan(
        layer_directions=directions.for_edited_layers(layer_directions),
        embed_direction=embed_direction,
        strengths={
            "attn": spec.attn.weights(num_layers),
            "mlp": spec.mlp.weights(num_layers),
            "embed": [spec.embed_weight],
        },
        targets=tuple(targets),
        norm_preserve=spec.norm_preserve,
    )


def load_plan_spec(path: str | Path) -> PlanSpec:
    """A plan spec from a JSON file: the spec itself, or an ``abliteration_log.json`` holding ``plan_spec``."""
    path = Path(path)
    if path.is_dir():
        path = path / "abliteration_log.json"
    if not path.is_file():
        raise UserError(
            f"plan file {path} does not exist; pass a plan-spec JSON or an abliteration_log.json from `search`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if isinstance(data, dict) and "plan_spec" in data:
        data = data["plan_spec"]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no plan spec")
    return PlanSpec.from_dict(data)
