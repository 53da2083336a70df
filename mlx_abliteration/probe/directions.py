"""Refusal directions per layer from harmful/harmless means, and layer choice."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from mlx_abliteration.config.defaults import DIRECTION_VARIANTS, separation_share
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_io import is_unreadable_weights
from mlx_abliteration.probe.capture import WelfordStats
from mlx_abliteration.runtime.mx_types import int_list, load_with_metadata, scalar


def calculate_refusal_direction(
    harmful_mean: mx.array, harmless_mean: mx.array, variant: str = "mean-diff"
) -> tuple[mx.array, float]:
    """Unit refusal direction r = d / ||d|| with d = harmful - harmless (float32).

    ``projected`` (and ``biprojected``, which also projects per edited layer: ``for_edited_layers``)
    removes from d its component along the harmless mean, so the edit leaves the model's ordinary
    activation direction alone.
    Returns ``(r, ||d||)`` where the norm is that of the raw difference.
    """
    if variant not in DIRECTION_VARIANTS:
        raise UserError(f"unknown direction variant {variant!r}; choose one of {', '.join(DIRECTION_VARIANTS)}")
    harmful = harmful_mean.astype(mx.float32)
    harmless = harmless_mean.astype(mx.float32)
    diff = harmful - harmless
    norm = scalar(mx.linalg.norm(diff))
    if variant in ("projected", "biprojected"):
        unit = harmless / mx.maximum(mx.linalg.norm(harmless), 1e-12)
        diff = diff - (diff * unit).sum() * unit
    length = mx.linalg.norm(diff)
    if not math.isfinite(norm) or not math.isfinite(scalar(length)):
        raise UserError(
            "the model produced NaN/inf activations (not a problem of the datasets): its weights hold NaN/inf "
            "or the compute dtype overflows; check the model files, or compute in float32"
        )
    if scalar(length) == 0.0:
        raise UserError("harmful and harmless activations are identical; the datasets do not separate")
    return diff / length, norm


@dataclass
class LayerStats:
    layer: int
    norm: float  # ||mean_harmful - mean_harmless||
    relative_norm: float  # norm / ||mean_harmless||
    cosine: float  # cos(mean_harmful, mean_harmless)
    separation: float  # norm / pooled per-direction std: a signal-to-noise ratio

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RefusalDirections:
    """Unit directions [L, H] for the probed layers, with per-layer statistics."""

    layers: list[int]
    directions: mx.array
    stats: list[LayerStats]
    variant: str
    num_model_layers: int
    degenerate: tuple[int, ...] = ()  # probed layers where both sets' means were equal (no direction)
    harmless_means: mx.array | None = None  # [L, H] unit harmless means of the probed layers (biprojected)

    def row(self, layer: int) -> int:
        return self.layers.index(layer)

    def direction(self, layer: float) -> mx.array:
        """Direction at a (possibly fractional) layer index, interpolated and renormalized."""
        lo = math.floor(layer)
        hi = math.ceil(layer)
        for bound in {lo, hi} & set(self.degenerate):
            raise UserError(
                f"layer {bound}: the harmful and harmless activations are identical there (no direction); choose another layer"
            )
        if lo not in self.layers or hi not in self.layers:
            raise UserError(f"layer {layer} was not probed; probed layers: {_ranges(self.layers)}")
        if lo == hi:
            return self.directions[self.row(lo)]
        t = layer - lo
        mixed = (1 - t) * self.directions[self.row(lo)] + t * self.directions[self.row(hi)]
        return mixed / mx.linalg.norm(mixed)

    def nearest_probed(self, layer: int) -> int:
        """The probed layer closest to ``layer`` (ties: the lower): layers left out of --layers borrow its data."""
        return min(self.layers, key=lambda probed: (abs(probed - layer), probed))

    def for_edited_layers(self, rows: mx.array) -> mx.array:
        """The directions ``rows`` [model layers, H] that each layer's writers are edited against.

        ``biprojected``: row t loses its component along layer t's harmless mean (the nearest probed
        layer's), so no edited layer's ordinary activation direction is touched; else ``rows`` as given.
        """
        if self.variant != "biprojected" or self.harmless_means is None:
            return rows
        out = []
        for layer in range(rows.shape[0]):
            nearest = self.row(self.nearest_probed(layer))
            mean = self.harmless_means[nearest : nearest + 1, :][0]
            row = rows[layer : layer + 1, :][0].astype(mx.float32)
            row = row - (row * mean).sum() * mean
            out.append(row / mx.maximum(mx.linalg.norm(row), 1e-12))
        return mx.stack(out)


def compute_directions(
    harmful: WelfordStats, harmless: WelfordStats, layers: list[int], num_model_layers: int, variant: str = "mean-diff"
) -> RefusalDirections:
    rows, stats, kept, degenerate = [], [], [], []
    pooled_var = (harmful.variance + harmless.variance) / 2
    for row, layer in enumerate(layers):
        # [row, :] is a slice; a lone integer index is a gather, which MLX's CUDA backend compiles at first use.
        a, b = harmful.mean[row, :], harmless.mean[row, :]
        if _equal_means(a, b):
            degenerate.append(
                layer
            )  # e.g. a layer the prompts' probe positions cannot tell apart (short-conv first layers)
            continue
        kept.append(layer)
        r, norm = calculate_refusal_direction(a, b, variant)
        rows.append(r)
        cos = scalar((a * b).sum() / (mx.linalg.norm(a) * mx.linalg.norm(b) + 1e-12))
        std = math.sqrt(max(scalar(pooled_var[row : row + 1]), 1e-12))
        rel = norm / max(scalar(mx.linalg.norm(b)), 1e-12)
        stats.append(LayerStats(layer, norm, rel, cos, norm / std))
    if not rows:
        raise UserError(
            "harmful and harmless activations are identical at every probed layer; the datasets do not separate"
        )
    directions = mx.stack(rows)
    means = None
    if variant == "biprojected":
        kept_rows = [layers.index(layer) for layer in kept]
        means = mx.stack([harmless.mean[i : i + 1, :][0] for i in kept_rows]).astype(mx.float32)
        means = means / mx.maximum(mx.linalg.norm(means, axis=-1, keepdims=True), 1e-12)
    mx.eval(directions, *([means] if means is not None else []))
    return RefusalDirections(kept, directions, stats, variant, num_model_layers, tuple(degenerate), means)


def _equal_means(a: mx.array, b: mx.array) -> bool:
    return bool(mx.array_equal(a.astype(mx.float32), b.astype(mx.float32)).item())


def _ranges(layers: list[int]) -> str:
    return (
        f"{min(layers)}..{max(layers)}"
        if layers == list(range(min(layers), max(layers) + 1))
        else ", ".join(map(str, layers))
    )


def ablate_layer_list(text: str | None, directions: RefusalDirections) -> list[int]:
    """``--ablate-layers``: a layer list (``parse_layer_list``), or ``separated[:F]``: the probed layers
    whose separation (direction norm / pooled std) is at least F times the largest. Layers where the two
    sets do not separate carry no refusal signal of their own; editing them costs KL for little effect."""
    share = separation_share(text)
    if share is None:
        return parse_layer_list(text, directions.num_model_layers)
    top = max(s.separation for s in directions.stats)
    return sorted(s.layer for s in directions.stats if s.separation >= share * top)


def parse_layer_list(text: str | None, num_layers: int) -> list[int]:
    """``--layers``: 'all', '10-20', '3,5,7', '-4--1', or fractions '0.4-0.8'."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        bounds = _split_range(part)
        try:
            values = [_layer_number(b, num_layers) for b in bounds]
        except ValueError:
            raise UserError(
                f"--layers: cannot parse {part!r}; use e.g. 'all', '10-20', '4,8,12' or '0.4-0.8'"
            ) from None
        lo, hi = values[0], values[-1]
        if lo > hi:
            raise UserError(f"--layers: range {part!r} is empty; write the smaller bound first")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def _split_range(part: str) -> list[str]:
    # A '-' that is not a leading sign separates bounds: '-4--1' -> ['-4', '-1'].
    for i in range(1, len(part)):
        if part[i] == "-" and part[i - 1] not in "-":
            return [part[:i], part[i + 1 :]]
    return [part]


def _layer_number(token: str, num_layers: int) -> int:
    token = token.strip()
    if "." in token:
        fraction = float(token)
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"layer fraction {token} must be within 0..1")
        return min(int(round(fraction * (num_layers - 1))), num_layers - 1)
    index = int(token)
    if index < 0:
        index += num_layers
    if not 0 <= index < num_layers:
        raise UserError(f"layer {token} is out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    return index


def parse_use_layer(value: str | int | float | None, num_layers: int) -> int | str:
    """``--use-layer``: 'auto', an index (negative counts from the end), or a fraction like 0.6."""
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise UserError(
            f"--use-layer {text!r} is not a layer; use 'auto', an index like 14 or -10, or a fraction like 0.5"
        ) from None
    if not math.isfinite(number):
        raise UserError(f"--use-layer {text!r} is not a finite number")
    if "." in text:
        if 0.0 <= number <= 1.0:
            return int(round(number * (num_layers - 1)))
        if not float(number).is_integer():
            raise UserError(f"--use-layer {text}: a fractional layer must be within 0..1 (a fraction of depth)")
    return _layer_number(str(int(number)), num_layers)


def direction_file_contents(directions: RefusalDirections, layer: int) -> tuple[dict, dict]:
    """Tensors and metadata of ``refusal_direction.safetensors``."""

    tensors = {
        "refusal_direction": directions.direction(layer),
        "layer_directions": directions.directions,
        "layers": mx.array(directions.layers, dtype=mx.int32),
    }
    if directions.harmless_means is not None:
        tensors["harmless_means"] = directions.harmless_means
    metadata = {
        "format": "mlx",
        "chosen_layer": str(layer),
        "num_model_layers": str(directions.num_model_layers),
        "variant": directions.variant,
        "layer_stats": json.dumps([s.to_dict() for s in directions.stats]),
    }
    return tensors, metadata


def save_directions(path: str | Path, directions: RefusalDirections, layer: int) -> None:
    tensors, metadata = direction_file_contents(directions, layer)
    mx.save_safetensors(str(path), tensors, metadata=metadata)


def load_directions(path: str | Path) -> tuple[RefusalDirections, int]:
    """Read a direction file written by ``save_directions`` (or a saved model's)."""

    path = Path(path)
    if path.is_dir():
        path = path / "refusal_direction.safetensors"
    if not path.is_file():
        raise UserError(
            f"direction file {path} does not exist; run `mlx-abliterate probe` first or point at a model dir that has one"
        )
    try:
        tensors, metadata = load_with_metadata(str(path))
        stats = [LayerStats(**s) for s in json.loads(metadata["layer_stats"])]
        layers = int_list(tensors["layers"])
        directions = RefusalDirections(
            layers,
            tensors["layer_directions"],
            stats,
            metadata["variant"],
            int(metadata["num_model_layers"]),
            harmless_means=tensors.get("harmless_means"),
        )
        chosen = int(metadata["chosen_layer"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        if isinstance(err, RuntimeError) and not is_unreadable_weights(err):
            raise  # out of memory, a bug: not a problem of the file
        raise UserError(f"{path} is not a refusal-direction file written by this tool ({err})") from err
    check_directions(path, directions, chosen)
    return directions, chosen


def check_directions(path: str | Path, directions: RefusalDirections, chosen: int) -> None:
    """What an edit needs of a direction file: one finite, non-zero row per probed layer (an untrusted file)."""
    rows = directions.directions
    bad = None
    if rows.ndim != 2 or rows.shape[0] != len(directions.layers) or rows.shape[1] == 0:
        bad = f"directions of shape {tuple(rows.shape)} for {len(directions.layers)} probed layer(s)"
    elif not mx.issubdtype(rows.dtype, mx.floating):
        bad = f"directions of type {rows.dtype}"
    elif directions.num_model_layers < 1:
        bad = f"a model of {directions.num_model_layers} layers"
    elif any(not 0 <= layer < directions.num_model_layers for layer in directions.layers):
        bad = f"layers outside 0..{directions.num_model_layers - 1}, the model's"
    elif chosen not in directions.layers:
        bad = f"a chosen layer {chosen} that was not probed"
    if bad is not None:
        raise UserError(f"{path} is not a usable refusal-direction file: it holds {bad}")
    norms = mx.linalg.norm(rows.astype(mx.float32), axis=-1)
    if not bool(mx.all(mx.isfinite(norms)).item()):
        raise UserError(f"{path} holds NaN/inf directions: the file is corrupt; probe the model again")
    if not bool(mx.all(norms > 0).item()):
        raise UserError(f"{path} holds a zero direction (no direction to remove); probe the model again")


def candidate_layers(probed: Sequence[int], num_layers: int, max_candidates: int = 8) -> list[int]:
    """Coarse grid over the probed layers within 25%..80% of depth."""
    lo, hi = int(0.25 * num_layers), int(0.8 * num_layers)
    middle = [layer for layer in probed if lo <= layer < hi] or list(probed)
    step = max(1, -(-len(middle) // max_candidates))
    return middle[::step]
