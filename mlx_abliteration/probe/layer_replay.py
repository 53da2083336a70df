"""Replaying a decoder layer's call: hooks that record, nudge or project a module's output, in float32 and uncompiled, and the numerics of the writer tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten

from mlx_abliteration.errors import UserError
from mlx_abliteration.runtime.mx_types import flat_params, float_list, scalar

# What hooks see of a module call: whatever the model passes (arrays, masks, caches) and returns.
Call = Callable[..., Any]


Args = tuple[Any, ...]


Kwargs = dict[str, Any]


Hook = Callable[[Call, Args, Kwargs], Any]


Position = int | str  # a call argument's index or keyword


Traces = dict[str, Any]  # module path -> (args, kwargs, output) of its call


Replay = tuple[Call, Args, Kwargs, Traces]  # how to rerun a layer, and what its modules saw


def first_array(out: Any) -> mx.array | None:
    if isinstance(out, mx.array):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], mx.array):
        return out[0]
    return None


def array_of(out: Any) -> mx.array:
    """The array a module returned (alone or first of a tuple); a module returning none is a bug here."""
    first = first_array(out)
    if first is None:
        raise TypeError(f"expected a module output holding an array, got {type(out).__name__}")
    return first


def replace_first(out: Any, value: mx.array) -> Any:
    if isinstance(out, mx.array):
        return value
    return type(out)([value, *out[1:]])


def recorder(store: dict[str, Any], key: str) -> Hook:
    """Records (args, kwargs, output); the output continues in float32 (tests need float32 precision)."""

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = upcast(call(*args, **kwargs))
        store[key] = (args, kwargs, out)
        return out

    return hook


def upcast(out: Any) -> Any:
    first = first_array(out)
    if first is None or not mx.issubdtype(first.dtype, mx.floating) or first.dtype == mx.float32:
        return out
    return replace_first(out, first.astype(mx.float32))


def nudger(delta: mx.array) -> Hook:
    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = upcast(call(*args, **kwargs))
        return replace_first(out, array_of(out) + delta)

    return hook


def projector(u: mx.array, nudge: mx.array | None = None) -> Hook:
    """The module's output loses its ``u`` component (what editing its weights against u does); plus ``nudge``.

    ``u`` is one unit vector [H], or orthonormal rows [k, H] (the output loses all k components).
    """

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = upcast(call(*args, **kwargs))
        y = array_of(out)
        y = y - (y @ u)[..., None] * u if u.ndim == 1 else y - (y @ u.T) @ u
        return replace_first(out, y if nudge is None else y + nudge)

    return hook


@contextlib.contextmanager
def uncompiled() -> Iterator[None]:
    """MLX's compiled functions run as the plain ops they are made of (``mx.disable_compile``), then compile again.

    On a GPU the model runs in its stored dtype (bf16), so these float32
    replays would be the only use of the float32 variant of mlx-lm's compiled
    activations (SiLU * up in Llama's MLP...). On CUDA every compiled function
    is a kernel MLX builds with NVRTC at first use, per dtype: ~3-5 s on an
    H200 for one used here on 16 tokens, again on every machine without MLX's
    kernel cache. Unfused ops on 16 tokens cost nothing (on the CPU too, where
    the model computes in float32 and the probe compiles that variant anyway).
    Left alone if the user disabled compilation (``MLX_DISABLE_COMPILE``).
    """
    if os.environ.get("MLX_DISABLE_COMPILE", "") not in ("", "0"):
        yield
        return
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()


def typical_norm(trace: tuple[Args, Kwargs, Any]) -> float:
    return typical_norms([trace])[0]


def typical_norms(traces: Sequence[tuple[Args, Kwargs, Any]]) -> list[float]:
    """Mean row norm of each trace's output (1.0 where it is 0), read back in one go (one GPU sync, not one each)."""
    means = [mx.mean(mx.linalg.norm(array_of(t[2]).astype(mx.float32), axis=-1)) for t in traces]
    return [value or 1.0 for value in float_list(mx.stack(means))] if means else []


def moves_along(change: mx.array, v: mx.array) -> bool | None:
    """True if every row of ``change`` that moved at all moved along ``v``; None if nothing moved."""
    rows = change.astype(mx.float32).reshape(-1, v.shape[-1])
    size = mx.linalg.norm(rows, axis=-1)
    scale = scalar(size.max())
    if not scale > 1e-6:
        return None
    off = mx.linalg.norm(rows - (rows @ v)[:, None] * v[None, :], axis=-1)
    moved = size > 1e-3 * scale
    return bool(mx.all(mx.where(moved, off <= PARALLEL_TOLERANCE * size, True)).item())


def proof_residual(update: mx.array, r: mx.array) -> float:
    """max over positions of |r . dh| / |dh| (0 where the update is 0; inf when it is NaN)."""
    rows = update.astype(mx.float32).reshape(-1, r.shape[-1])
    size = mx.linalg.norm(rows, axis=-1)
    ratio = mx.abs(rows @ r) / mx.maximum(size, 1e-30)
    residual = scalar(mx.max(mx.where(size > 1e-6 * mx.max(size), ratio, 0.0)))
    return residual if residual == residual else float("inf")


def check_finite(value: mx.array, where: str, model_type: str) -> None:
    if not mx.all(mx.isfinite(value)).item():
        raise UserError(
            f"{model_type}: {where} gives NaN/inf activations; the model's weights hold NaN/inf or overflow: check the model files"
        )


def orthonormal(key: mx.array, count: int, size: int) -> mx.array:
    """``count`` orthonormal random rows of width ``size`` (QR of a Gaussian matrix)."""
    if count > size:
        raise UserError(f"a decoder layer has {count} modules of the residual width {size}; too many to test at once")
    q, _ = mx.linalg.qr(mx.random.normal((size, count), key=key), stream=mx.cpu)
    return q.T.astype(mx.float32)


def random_unit(key: mx.array, size: int) -> mx.array:
    v = mx.random.normal((size,), key=key)
    return v / mx.linalg.norm(v)


def as_float32(tree: Any) -> Any:
    return tree_map(
        lambda x: x.astype(mx.float32) if isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating) else x, tree
    )


def norm_like(module: nn.Module, size: int) -> bool:
    """A parameter-light elementwise module (a norm): only 1-D parameters of the residual width."""
    if isinstance(module, editable_types() + table_types()):
        return False
    leaves = [v for _, v in flat_params(module.parameters())]
    return all(v.ndim == 1 and v.shape[0] == size for v in leaves)


def norm_gain(norm: nn.Module, size: int) -> mx.array:
    """g of a norm computing g * y / rms(y): its output for a constant input."""
    gain = array_of(norm(mx.ones((1, size), mx.float32)))
    return gain.reshape(-1)[:size].astype(mx.float32)


def arg_at(args: Args, kwargs: Kwargs, position: Position) -> Any:
    return args[position] if isinstance(position, int) else kwargs[position]


def with_arg(args: Args, kwargs: Kwargs, position: Position, value: Any) -> tuple[Args, Kwargs]:
    if isinstance(position, int):
        return args[:position] + (value,) + args[position + 1 :], kwargs
    return args, {**kwargs, position: value}


def unflatten(flat: list[tuple[str, mx.array]]) -> Any:
    return tree_unflatten(flat)


def upcasting(call: Call, args: Args, kwargs: Kwargs) -> Any:
    return upcast(call(*args, **kwargs))


class StopForward(Exception):
    """Raised once the last needed layer ran: the rest of the forward pass is not needed."""


def stopper(store: dict[str, Any]) -> Hook:
    """Records the first decoder layer's hidden-state input, then ends the forward pass."""

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        named = [kwargs[k] for k in ("x", "hidden_states", "h", "inputs_embeds") if k in kwargs]
        for value in list(args[:1]) + named + list(kwargs.values()):
            if isinstance(value, mx.array) and value.ndim >= 3:
                store["__layer0__"] = value.astype(mx.float32)
                break
        raise StopForward

    return hook


def editable_types() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def table_types() -> tuple[type, ...]:
    return (nn.Embedding, nn.QuantizedEmbedding)


PARALLEL_TOLERANCE = 1e-3  # |component of the change off v| / |change|, float32


PROOF_TOLERANCE = 1e-3  # |r . dh| / |dh| after projecting every writer
