"""Find the modules that write into the residual stream, by what they do, not by their names.

A writer is a module whose output is added into the residual stream: nudge its
output by ``e v`` and the decoder layer's output moves along ``v`` at every
position it touches. Names do not decide it (``w2`` writes in Llama-style
MoE experts and reads in Qwen v1; Phi-2 writes with ``dense``/``fc2``).

Post-norm blocks (Gemma 2/3, OLMo 2) normalize a branch's output before the
residual add: there the *norm* passes the test, and the modules writing into
the norm's input are the writers, orthogonalized against
``u = g * r / |g * r|`` with ``g`` the norm's per-channel gain (Gemma: 1 + w).

Every decoder layer is tested on the model's own forward pass: when the model
calls a layer, the call is replayed with the same arguments, once per
candidate, in float32. Then the found set is proven: with every writer's
output projected off a random direction r (exactly what the weight edit does
to a linear map or an embedding), the layer's update ``h_out - h_in`` must
have no r component. A layer that fails is an error, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten

from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.capture import decoder_layers
from mlx_abliteration.runtime.hooks import hooks
from mlx_abliteration.runtime.mx_types import flat_params, float_list, scalar

PARALLEL_TOLERANCE = 1e-3  # |component of the change off v| / |change|, float32
PROOF_TOLERANCE = 1e-3  # |r . dh| / |dh| after projecting every writer
PROBE_TOKENS = 16  # tokens of the discovery forward pass (enough to route to most MoE experts)
_BRANCH_WORDS = (
    "attn",
    "attention",
    "mixer",
    "mamba",
    "conv",
    "temporal",
    "time_mix",
    "ssm",
    "token_mix",
    "linear_attn",
)


@dataclass(eq=False)
class Writer:
    """One module that writes into the residual stream.

    ``rows``: an embedding table (edit its rows, E' = E - s (E u) u^T);
    otherwise a linear map stored (out, in) (W' = W - s u (u^T W)).
    ``gain``: the per-channel gain of a norm between the module and the
    residual add (post-norm blocks); the module is edited against g * r.
    """

    path: str
    role: str  # "embed" | "attn" | "mlp": which strength applies
    layer: int | None
    rows: bool
    norm: str | None = None
    gain: mx.array | None = field(default=None, repr=False)

    def direction(self, r: mx.array) -> mx.array:
        r = r.astype(mx.float32)
        if self.gain is None:
            return r
        u = self.gain.astype(mx.float32) * r
        return u / mx.maximum(mx.linalg.norm(u), 1e-30)

    def to_dict(self) -> dict:
        return {"role": self.role, "layer": self.layer, "rows": self.rows, "norm": self.norm}


WriterMap = dict[str, Writer]  # module path -> Writer

# What hooks see of a module call: whatever the model passes (arrays, masks, caches) and returns.
Call = Callable[..., Any]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
Hook = Callable[[Call, Args, Kwargs], Any]
Position = int | str  # a call argument's index or keyword
Traces = dict[str, Any]  # module path -> (args, kwargs, output) of its call
Replay = tuple[Call, Args, Kwargs, Traces]  # how to rerun a layer, and what its modules saw


def _editable_types() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def _table_types() -> tuple[type, ...]:
    return (nn.Embedding, nn.QuantizedEmbedding)


def branch_role(path: str) -> str:
    """ "attn" for attention / mixer branches, else "mlp" (which strength a writer gets)."""
    parts = path.lower().split(".")
    return "attn" if any(word in part for part in parts for word in _BRANCH_WORDS) else "mlp"


def _first_array(out: Any) -> mx.array | None:
    if isinstance(out, mx.array):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], mx.array):
        return out[0]
    return None


def _array_of(out: Any) -> mx.array:
    """The array a module returned (alone or first of a tuple); a module returning none is a bug here."""
    first = _first_array(out)
    if first is None:
        raise TypeError(f"expected a module output holding an array, got {type(out).__name__}")
    return first


def _replace_first(out: Any, value: mx.array) -> Any:
    if isinstance(out, mx.array):
        return value
    return type(out)([value, *out[1:]])


def _recorder(store: dict[str, Any], key: str) -> Hook:
    """Records (args, kwargs, output); the output continues in float32 (tests need float32 precision)."""

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = _upcast(call(*args, **kwargs))
        store[key] = (args, kwargs, out)
        return out

    return hook


def _upcast(out: Any) -> Any:
    first = _first_array(out)
    if first is None or not mx.issubdtype(first.dtype, mx.floating) or first.dtype == mx.float32:
        return out
    return _replace_first(out, first.astype(mx.float32))


def _nudger(delta: mx.array) -> Hook:
    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = _upcast(call(*args, **kwargs))
        return _replace_first(out, _array_of(out) + delta)

    return hook


def _projector(u: mx.array, nudge: mx.array | None = None) -> Hook:
    """The module's output loses its ``u`` component (what editing its weights against u does); plus ``nudge``.

    ``u`` is one unit vector [H], or orthonormal rows [k, H] (the output loses all k components).
    """

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        out = _upcast(call(*args, **kwargs))
        y = _array_of(out)
        y = y - (y @ u)[..., None] * u if u.ndim == 1 else y - (y @ u.T) @ u
        return _replace_first(out, y if nudge is None else y + nudge)

    return hook


@contextlib.contextmanager
def _uncompiled() -> Iterator[None]:
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


def _typical_norm(trace: tuple[Args, Kwargs, Any]) -> float:
    return _typical_norms([trace])[0]


def _typical_norms(traces: Sequence[tuple[Args, Kwargs, Any]]) -> list[float]:
    """Mean row norm of each trace's output (1.0 where it is 0), read back in one go (one GPU sync, not one each)."""
    means = [mx.mean(mx.linalg.norm(_array_of(t[2]).astype(mx.float32), axis=-1)) for t in traces]
    return [value or 1.0 for value in float_list(mx.stack(means))] if means else []


# --- the tests -------------------------------------------------------------------


def _moves_along(change: mx.array, v: mx.array) -> bool | None:
    """True if every row of ``change`` that moved at all moved along ``v``; None if nothing moved."""
    rows = change.astype(mx.float32).reshape(-1, v.shape[-1])
    size = mx.linalg.norm(rows, axis=-1)
    scale = scalar(size.max())
    if not scale > 1e-6:
        return None
    off = mx.linalg.norm(rows - (rows @ v)[:, None] * v[None, :], axis=-1)
    moved = size > 1e-3 * scale
    return bool(mx.all(mx.where(moved, off <= PARALLEL_TOLERANCE * size, True)).item())


def _proof_residual(update: mx.array, r: mx.array) -> float:
    """max over positions of |r . dh| / |dh| (0 where the update is 0; inf when it is NaN)."""
    rows = update.astype(mx.float32).reshape(-1, r.shape[-1])
    size = mx.linalg.norm(rows, axis=-1)
    ratio = mx.abs(rows @ r) / mx.maximum(size, 1e-30)
    residual = scalar(mx.max(mx.where(size > 1e-6 * mx.max(size), ratio, 0.0)))
    return residual if residual == residual else float("inf")


def _check_finite(value: mx.array, where: str, model_type: str) -> None:
    if not mx.all(mx.isfinite(value)).item():
        raise UserError(
            f"{model_type}: {where} gives NaN/inf activations; the model's weights hold NaN/inf or overflow: check the model files"
        )


def _orthonormal(key: mx.array, count: int, size: int) -> mx.array:
    """``count`` orthonormal random rows of width ``size`` (QR of a Gaussian matrix)."""
    if count > size:
        raise UserError(f"a decoder layer has {count} modules of the residual width {size}; too many to test at once")
    q, _ = mx.linalg.qr(mx.random.normal((size, count), key=key), stream=mx.cpu)
    return q.T.astype(mx.float32)


def _unit(key: mx.array, size: int) -> mx.array:
    v = mx.random.normal((size,), key=key)
    return v / mx.linalg.norm(v)


def _as_float32(tree: Any) -> Any:
    return tree_map(
        lambda x: x.astype(mx.float32) if isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating) else x, tree
    )


def _norm_like(module: nn.Module, size: int) -> bool:
    """A parameter-light elementwise module (a norm): only 1-D parameters of the residual width."""
    if isinstance(module, _editable_types() + _table_types()):
        return False
    leaves = [v for _, v in flat_params(module.parameters())]
    return all(v.ndim == 1 and v.shape[0] == size for v in leaves)


def _norm_gain(norm: nn.Module, size: int) -> mx.array:
    """g of a norm computing g * y / rms(y): its output for a constant input."""
    gain = _array_of(norm(mx.ones((1, size), mx.float32)))
    return gain.reshape(-1)[:size].astype(mx.float32)


# --- discovery ----------------------------------------------------------------------


class _LayerProbe:
    """Everything learnt about one decoder layer while the model calls it."""

    def __init__(self, finder: WriterFinder, index: int, layer: nn.Module, paths: dict[int, str]):
        self.finder, self.index, self.layer = finder, index, layer
        unique = {
            id(m): m for _, m in layer.named_modules() if id(m) in paths and m is not layer
        }  # shared modules once
        self.modules = [(paths[key], m) for key, m in unique.items()]

    def run(self, call: Call, args: Args, kwargs: Kwargs) -> Any:
        stream = self.finder.stream_positions(args, kwargs)
        args32, kwargs32 = _as_float32(args), _as_float32(kwargs)
        with self._float32(), _uncompiled():
            base, traces = self._replay(call, args32, kwargs32, record=True)
            _check_finite(base, f"decoder layer {self.index}", self.finder.model_type)
            if not stream or base.ndim != 3 or _at(args32, kwargs32, stream[0]).shape != base.shape:
                raise UserError(
                    f"decoder layer {self.index} of {self.finder.model_type} returns a hidden state shaped "
                    f"{tuple(base.shape)} unlike its input: several parallel residual streams are not supported"
                )
            self.finder.width = base.shape[-1]
            writers = self._find(call, args32, kwargs32, base, traces)
            writers = self._prove(call, args32, kwargs32, base, stream, writers, traces)
        self.finder.found.update({w.path: w for w in writers})
        out = call(*args, **kwargs)
        self.finder.stream.append(_array_of(out))
        return out

    @contextlib.contextmanager
    def _float32(self) -> Iterator[None]:
        saved = flat_params(self.layer.parameters())
        if any(v.dtype in (mx.float16, mx.bfloat16) for _, v in saved):
            self.layer.set_dtype(mx.float32)
        try:
            yield
        finally:
            self.layer.update(_unflatten(saved))

    def _replay(
        self,
        call: Call,
        args: Args,
        kwargs: Kwargs,
        extra: Sequence[tuple[nn.Module, Hook]] = (),
        record: bool = False,
    ) -> tuple[mx.array, Traces]:
        traces: Traces = {}
        pairs = [(m, _recorder(traces, p)) for p, m in self.modules if record and not _has_children(m)]
        with hooks(list(extra) + pairs):
            out = _array_of(call(*args, **kwargs))
            mx.eval(out)
        return out, traces

    def _candidates(self, traces: Traces, size: int) -> list[tuple[str, nn.Module]]:
        out = []
        for path, module in self.modules:
            trace = traces.get(path)
            y = trace and _first_array(trace[2])
            if (
                y is not None
                and y.shape[-1] == size
                and (isinstance(module, _editable_types()) or _norm_like(module, size))
            ):
                out.append((path, module))
        return out

    def _direct_writers(
        self, call: Call, args: Args, kwargs: Kwargs, base: mx.array, traces: Traces
    ) -> list[tuple[str, nn.Module]]:
        """Candidates whose output is added into the layer's output as it is.

        Each candidate gets its own direction ``v_c`` (orthonormal), and every
        candidate's output is projected off all of them, so nothing downstream
        can write along any ``v``; nudging each candidate's output by
        ``e_c v_c`` at once then moves the layer output along ``v_c`` only if
        that output is added into the residual stream (such additions are
        linear, so one replay tests every candidate).
        """
        size = base.shape[-1]
        candidates = self._candidates(traces, size)
        if not candidates:
            return []
        basis = _orthonormal(self.finder.next_key(), len(candidates), size)
        reference, _ = self._replay(call, args, kwargs, [(m, _projector(basis)) for _, m in candidates])
        scales = _typical_norms([traces[path] for path, _ in candidates])
        # basis[i, :], not basis[i]: MLX runs a lone integer index as a gather (a kernel its CUDA backend
        # compiles with NVRTC at first use, ~3 s), an index tuple as a slice
        nudged = [
            (m, _projector(basis, nudge=scale * basis[i, :]))
            for i, ((_, m), scale) in enumerate(zip(candidates, scales))
        ]
        out, _ = self._replay(call, args, kwargs, nudged)
        moved = float_list(mx.abs((out - reference).astype(mx.float32).reshape(-1, size) @ basis.T).max(axis=0))
        return [c for c, m, scale in zip(candidates, moved, scales) if m > 1e-3 * scale]

    def _feeding(
        self, call: Call, args: Args, kwargs: Kwargs, traces: Traces, sink: tuple[str, nn.Module]
    ) -> list[tuple[str, nn.Module]]:
        """Modules whose output is ``sink``'s input as it is (what a post-norm normalizes)."""
        sink_base = _array_of(traces[sink[0]][0])
        size = sink_base.shape[-1]
        found = []
        for path, module in self._candidates(traces, size):
            if module is sink[1]:
                continue
            v = _unit(self.finder.next_key(), size)
            seen: dict = {}
            self._replay(
                call,
                args,
                kwargs,
                [(module, _nudger(_typical_norm(traces[path]) * v)), (sink[1], _recorder(seen, "sink"))],
            )
            moved = _first_array(seen["sink"][0]) if "sink" in seen else None
            if moved is not None and moved.shape == sink_base.shape and _moves_along(moved - sink_base, v):
                found.append((path, module))
        return found

    def _find(self, call: Call, args: Args, kwargs: Kwargs, base: mx.array, traces: Traces) -> list[Writer]:
        writers: dict[str, Writer] = {}
        for path, module in self._direct_writers(call, args, kwargs, base, traces):
            self._resolve(writers, path, module, None, None, (call, args, kwargs, traces))
        return _with_siblings(list(writers.values()), self.modules)

    def _resolve(
        self,
        writers: dict[str, Writer],
        path: str,
        module: nn.Module,
        norm: str | None,
        gain: mx.array | None,
        replay: Replay,
        depth: int = 0,
    ) -> None:
        """A linear map is a writer; a norm passes the question on to what feeds it, its gain multiplied in.

        Chains of norms (Gemma 4 normalizes each FFN path, then their sum) end
        at linear maps edited against g_outer * g_inner * r.
        """
        if isinstance(module, _editable_types()):
            writers.setdefault(path, Writer(path, branch_role(path), self.index, rows=False, norm=norm, gain=gain))
            return
        if depth >= 4:
            return
        call, args, kwargs, traces = replay
        width = self.finder.width
        assert width is not None, "run() sets the width before resolving writers"
        g = _norm_gain(module, width)
        gain = g if gain is None else gain * g
        for inner, m in self._feeding(call, args, kwargs, traces, (path, module)):
            self._resolve(writers, inner, m, path, gain, replay, depth + 1)

    def _prove(
        self,
        call: Call,
        args: Args,
        kwargs: Kwargs,
        base: mx.array,
        stream: list[Position],
        writers: list[Writer],
        traces: Traces,
    ) -> list[Writer]:
        """``writers``, proven; or the smallest set of linear maps that passes, found by elimination; or an error.

        The elimination covers writers the nudge test cannot see, e.g. a
        branch normalized without a gain (a functional rms_norm) before the add.
        """
        r = _unit(self.finder.next_key(), base.shape[-1])
        residual = self._residual(call, args, kwargs, stream, writers, r)
        if residual <= PROOF_TOLERANCE:
            return writers
        have = {w.path for w in writers}
        extra = [
            Writer(p, branch_role(p), self.index, rows=False)
            for p, m in self._candidates(traces, base.shape[-1])
            if p not in have and isinstance(m, _editable_types())
        ]
        kept = _smallest_passing(writers, extra, lambda ws: self._residual(call, args, kwargs, stream, ws, r))
        if kept is not None:
            return _with_siblings(kept, self.modules)
        found = ", ".join(_short(w.path, self.index) for w in writers) or "none"
        others = ", ".join(_short(p, self.index) for p, _ in self._candidates(traces, base.shape[-1]) if p not in have)
        raise UserError(
            f"{self.finder.model_type}: decoder layer {self.index} still writes {residual:.1%} of a direction into the "
            f"residual stream after editing its writers ({found}): part of its update comes from no editable matrix "
            f"(e.g. identity experts, a norm's bias, a parameter vector); other modules of matching width: {others or 'none'}. "
            "This architecture is not supported"
        )

    def _residual(
        self, call: Call, args: Args, kwargs: Kwargs, stream: list[Position], writers: list[Writer], r: mx.array
    ) -> float:
        """max |r . dh| / |dh| with every writer's output projected off its direction (NaN counts as inf).

        The layer's residual-stream inputs (``stream``: the hidden state first,
        then e.g. Talkie's embedding skip) are projected off r too, as they
        are in the edited model (the embedding and every earlier layer write
        nothing along r), so a layer that scales its whole stream (Gemma 4's
        layer_scalar) is judged by what it adds.
        """
        by_path = dict(self.modules)
        for position in stream:
            value = _at(args, kwargs, position)
            args, kwargs = _put(args, kwargs, position, value - (value @ r)[..., None] * r)
        clean = _at(args, kwargs, stream[0])
        out, _ = self._replay(call, args, kwargs, [(by_path[w.path], _projector(w.direction(r))) for w in writers])
        return _proof_residual(out - clean, r)


def _at(args: Args, kwargs: Kwargs, position: Position) -> Any:
    return args[position] if isinstance(position, int) else kwargs[position]


def _put(args: Args, kwargs: Kwargs, position: Position, value: Any) -> tuple[Args, Kwargs]:
    if isinstance(position, int):
        return args[:position] + (value,) + args[position + 1 :], kwargs
    return args, {**kwargs, position: value}


def _smallest_passing(
    found: list[Writer], extra: list[Writer], residual: Callable[[list[Writer]], float]
) -> list[Writer] | None:
    """``found`` plus the fewest of ``extra`` whose projection passes the proof (one elimination pass), or None."""
    if not extra or not residual(found + extra) <= PROOF_TOLERANCE:
        return None
    for candidate in list(extra):
        rest = [w for w in extra if w is not candidate]
        if residual(found + rest) <= PROOF_TOLERANCE:
            extra = rest
    return found + extra


def _short(path: str, layer: int) -> str:
    match = re.search(rf"\.{layer}\.(.+)$", path)
    return match.group(1) if match else path


def _has_children(module: nn.Module) -> bool:
    return any(
        isinstance(v, (nn.Module, list, dict)) and (not isinstance(v, (list, dict)) or _holds_module(v))
        for v in module.values()
    )


def _holds_module(value: list | dict) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(x, nn.Module) or (isinstance(x, (list, dict)) and _holds_module(x)) for x in items)


def _unflatten(flat: list[tuple[str, mx.array]]) -> Any:

    return tree_unflatten(flat)


def _with_siblings(writers: list[Writer], modules: list[tuple[str, nn.Module]]) -> list[Writer]:
    """Add the same-named module of every sibling expert (``experts.3.w2`` like ``experts.0.w2``).

    Experts a short probe does not route to are never called, so they cannot
    be tested; they are built like the tested ones.
    """
    pattern = {re.sub(r"\.\d+\.", ".*.", w.path): w for w in writers}
    have = {w.path for w in writers}
    out = list(writers)
    for path, module in modules:
        w = pattern.get(re.sub(r"\.\d+\.", ".*.", path))
        if w is not None and path not in have and isinstance(module, _editable_types()):
            out.append(Writer(path, w.role, w.layer, w.rows, w.norm, w.gain))
            have.add(path)
    return out


def _hidden_input(args: Args, kwargs: Kwargs, out: mx.array) -> mx.array | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, mx.array) and value.shape == out.shape:
            return value
    return None


class WriterFinder:
    def __init__(self, model: nn.Module, model_type: str, seed: int = 0):
        self.model, self.model_type = model, model_type
        self.key = mx.random.key(seed)
        self.found: WriterMap = {}
        self.width: int | None = None
        self.stream: list[
            mx.array
        ] = []  # residual-stream arrays seen so far: the embedding output, each layer's output

    def stream_positions(self, args: Args, kwargs: Kwargs) -> list[Position]:
        """Positions (index or keyword) of a layer's residual-stream inputs, the hidden state first.

        The hidden state is the previous layer's output (or, for the first
        layer, its first [B, T, H] input, which becomes the embedding output);
        other inputs that are earlier stream arrays (Talkie's embedding skip)
        follow. Value-space inputs (RWKV-7's v_first) are not stream arrays.
        """
        items = list(enumerate(args)) + list(kwargs.items())
        if not self.stream:
            first = next((v for _, v in items if isinstance(v, mx.array) and v.ndim == 3), None)
            if first is None:
                return []
            self.stream.append(first)
        known = {id(a) for a in self.stream}
        found = [(pos, v) for pos, v in items if isinstance(v, mx.array) and id(v) in known]
        found.sort(key=lambda item: item[1] is not self.stream[-1])  # the latest stream array is the hidden state
        return [pos for pos, v in found if v is self.stream[-1]][:1] and [pos for pos, _ in found]

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def run(self, token_ids: Sequence[int], release: Callable[[int], None] | None = None) -> WriterMap:
        layers = decoder_layers(self.model)
        paths = {id(m): p for p, m in self.model.named_modules()}
        tokens = mx.array([list(token_ids)])
        self._embedding_writers(layers[0], tokens, paths)
        called: set[int] = set()

        def layer_hook(index: int, layer: nn.Module) -> Hook:
            probe = _LayerProbe(self, index, layer, paths)

            def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
                out = probe.run(call, args, kwargs)
                mx.eval(_array_of(out))
                called.add(index)
                if release is not None:
                    release(index)
                if index == len(layers) - 1:
                    raise _Done
                return out

            return hook

        try:
            with hooks([(layer, layer_hook(i, layer)) for i, layer in enumerate(layers)]):
                self.model(tokens)
        except _Done:
            pass
        missing = [i for i in range(len(layers)) if i not in called]
        if missing:
            raise UserError(
                f"{self.model_type}: the forward pass never called decoder layer(s) {missing[:8]}; this architecture is not supported"
            )
        return self.found

    def _embedding_writers(self, first_layer: nn.Module, tokens: mx.array, paths: dict[int, str]) -> None:
        """Tables (and norms right after them) whose output reaches layer 0's input along the nudge."""
        traces: Traces = {}  # path -> (args, kwargs, output); "__layer0__" -> layer 0's input
        stops = [(first_layer, _stopper(traces))]
        layer_modules = {
            id(m) for layers in [decoder_layers(self.model)] for layer in layers for _, m in layer.named_modules()
        }
        outside = [(p, m) for p, m in self.model.named_modules() if id(m) not in layer_modules and not _has_children(m)]
        self._outside = outside
        self._forward_to_first_layer(tokens, stops + [(m, _recorder(traces, p)) for p, m in outside])
        base = traces["__layer0__"]
        _check_finite(base, "the embedding", self.model_type)
        size = base.shape[-1]
        self.width = size
        found: list[Writer] = []
        for path, module in outside:
            y = traces.get(path) and _first_array(traces[path][2])
            if y is None or y.shape[-1] != size:
                continue
            is_table = isinstance(module, _table_types())
            if not (is_table or isinstance(module, _editable_types()) or _norm_like(module, size)):
                continue
            v = _unit(self.next_key(), size)
            scale = _typical_norm(traces[path])
            seen: dict = {}
            self._forward_to_first_layer(tokens, [(first_layer, _stopper(seen)), (module, _nudger(scale * v))])
            if not _moves_along(seen["__layer0__"] - base, v):
                continue
            if is_table or isinstance(module, _editable_types()):
                found.append(Writer(path, "embed", None, rows=is_table))
            else:
                found += self._embedding_behind_norm(path, module, first_layer, tokens, traces, outside, size)
        found = self._prove_embedding(found, first_layer, tokens, traces, size)
        if not any(w.rows for w in found):
            raise UserError(
                f"{self.model_type}: no token embedding table writes into the first decoder layer's input; this architecture is not supported"
            )
        self.found.update({w.path: w for w in found})

    def _embedding_behind_norm(
        self,
        norm_path: str,
        norm: nn.Module,
        first_layer: nn.Module,
        tokens: mx.array,
        traces: Traces,
        outside: list[tuple[str, nn.Module]],
        size: int,
    ) -> list[Writer]:
        gain = _norm_gain(norm, size)
        sink_base = _array_of(traces[norm_path][0])
        found = []
        for path, module in outside:
            y = traces.get(path) and _first_array(traces[path][2])
            if (
                module is norm
                or y is None
                or y.shape[-1] != size
                or not isinstance(module, _table_types() + _editable_types())
            ):
                continue
            v = _unit(self.next_key(), size)
            seen: dict = {}
            self._forward_to_first_layer(
                tokens, [(first_layer, _stopper({})), (module, _nudger(v)), (norm, _recorder(seen, "sink"))]
            )
            if "sink" in seen and _moves_along(_array_of(seen["sink"][0]) - sink_base, v):
                found.append(
                    Writer(path, "embed", None, rows=isinstance(module, _table_types()), norm=norm_path, gain=gain)
                )
        return found

    def _prove_embedding(
        self, found: list[Writer], first_layer: nn.Module, tokens: mx.array, traces: Traces, size: int
    ) -> list[Writer]:
        """``found``, proven; or the smallest set of tables and linear maps that passes (by elimination); or an error.

        The elimination covers tables the nudge test cannot see, e.g. an
        embedding normalized without a gain (nanochat's functional rms_norm).
        """
        r = _unit(self.next_key(), size)
        residual = self._embedding_residual(found, first_layer, tokens, r)
        if residual <= PROOF_TOLERANCE:
            return found
        have = {w.path for w in found}
        extra = []
        for path, module in self._outside:
            y = traces.get(path) and _first_array(traces[path][2])
            if (
                path not in have
                and y is not None
                and y.shape[-1] == size
                and isinstance(module, _table_types() + _editable_types())
            ):
                extra.append(Writer(path, "embed", None, rows=isinstance(module, _table_types())))
        kept = _smallest_passing(found, extra, lambda ws: self._embedding_residual(ws, first_layer, tokens, r))
        if kept is not None:
            return kept
        names = ", ".join(w.path for w in found) or "none"
        raise UserError(
            f"{self.model_type}: the first decoder layer's input keeps {residual:.1%} of a direction after editing "
            f"the embedding writers ({names}); this architecture is not supported"
        )

    def _embedding_residual(
        self, writers: list[Writer], first_layer: nn.Module, tokens: mx.array, r: mx.array
    ) -> float:
        by_path = dict(self._outside)
        seen: dict = {}
        self._forward_to_first_layer(
            tokens, [(first_layer, _stopper(seen))] + [(by_path[w.path], _projector(w.direction(r))) for w in writers]
        )
        return _proof_residual(seen["__layer0__"], r)

    def _forward_to_first_layer(self, tokens: mx.array, pairs: Sequence[tuple[nn.Module, Hook]]) -> None:
        """The forward pass up to the first layer's input, every module before it computing in float32."""
        hooked = {id(m) for m, _ in pairs}
        pairs = list(pairs) + [(m, _upcasting) for _, m in self._outside if id(m) not in hooked]
        try:
            with hooks(pairs):
                self.model(tokens)
        except _Done:
            return
        raise UserError(
            f"{self.model_type}: the forward pass never called the first decoder layer; this architecture is not supported"
        )


def _upcasting(call: Call, args: Args, kwargs: Kwargs) -> Any:
    return _upcast(call(*args, **kwargs))


class _Done(Exception):
    """Raised once the last needed layer ran: the rest of the forward pass is not needed."""


def _stopper(store: dict[str, Any]) -> Hook:
    """Records the first decoder layer's hidden-state input, then ends the forward pass."""

    def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
        named = [kwargs[k] for k in ("x", "hidden_states", "h", "inputs_embeds") if k in kwargs]
        for value in list(args[:1]) + named + list(kwargs.values()):
            if isinstance(value, mx.array) and value.ndim >= 3:
                store["__layer0__"] = value.astype(mx.float32)
                break
        raise _Done

    return hook


def discover_writers(
    model: nn.Module,
    model_type: str = "model",
    token_ids: Sequence[int] | None = None,
    release: Callable[[int], None] | None = None,
) -> WriterMap:
    """Every residual writer of ``model``, each proven on a real forward pass.

    ``release(i)`` is called once decoder layer ``i`` is done (a lazily
    loaded model can drop its weights there). Raises ``UserError`` naming the
    layer and its unmatched modules if a layer's update cannot be made
    orthogonal to a direction by editing the writers found.
    """
    ids = list(token_ids) if token_ids is not None else [1 + (7 * i) % 11 for i in range(PROBE_TOKENS)]
    return WriterFinder(model, model_type).run(ids, release)


def model_writers(model: nn.Module) -> WriterMap:
    """``discover_writers`` once per model object (the result is kept on the model)."""
    found = model.__dict__.get("_abliteration_writers")
    if found is None:
        model_type = getattr(model, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
        found = discover_writers(model, str(model_type))
        object.__setattr__(model, "_abliteration_writers", found)
    return found


def describe_writers(writers: WriterMap) -> str:
    """One line: which modules write into the residual stream (per layer) and the embedding tables."""
    per_layer: dict[str, None] = {}
    embeds = []
    for w in writers.values():
        if w.layer is None:
            embeds.append(w.path)
            continue
        name = _short(w.path, w.layer)
        per_layer[re.sub(r"\.\d+\.", ".*.", name) + (f" (behind {_short(w.norm, w.layer)})" if w.norm else "")] = None
    layers = len({w.layer for w in writers.values() if w.layer is not None})
    return f"{len(writers)} residual writers: {', '.join(per_layer) or 'none'} in {layers} layers; embedding: {', '.join(embeds) or 'none'}"
