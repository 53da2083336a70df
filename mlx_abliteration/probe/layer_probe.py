"""One decoder layer's writers, found and proven while the model calls the layer: each candidate's output nudged along a random direction, then every writer projected off r and the layer's update checked."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.layer_replay import (
    PROOF_TOLERANCE,
    Args,
    Call,
    Hook,
    Kwargs,
    Position,
    Replay,
    Traces,
    arg_at,
    array_of,
    as_float32,
    check_finite,
    editable_types,
    first_array,
    moves_along,
    norm_gain,
    norm_like,
    nudger,
    orthonormal,
    projector,
    proof_residual,
    random_unit,
    recorder,
    typical_norm,
    typical_norms,
    uncompiled,
    unflatten,
    with_arg,
)
from mlx_abliteration.probe.writers import Writer, WriterMap, branch_role, short_path
from mlx_abliteration.runtime.hooks import hooks
from mlx_abliteration.runtime.mx_types import flat_params, float_list


class Finder(Protocol):
    """What a layer's probe shares with the whole model's discovery (``writer_discovery.WriterFinder``)."""

    model_type: str
    width: int | None
    found: WriterMap
    stream: list[mx.array]

    def stream_positions(self, args: Args, kwargs: Kwargs) -> list[Position]: ...

    def next_key(self) -> mx.array: ...


class LayerProbe:
    """Everything learnt about one decoder layer while the model calls it."""

    def __init__(self, finder: Finder, index: int, layer: nn.Module, paths: dict[int, str]):
        self.finder, self.index, self.layer = finder, index, layer
        unique = {
            id(m): m for _, m in layer.named_modules() if id(m) in paths and m is not layer
        }  # shared modules once
        self.modules = [(paths[key], m) for key, m in unique.items()]

    def run(self, call: Call, args: Args, kwargs: Kwargs) -> Any:
        stream = self.finder.stream_positions(args, kwargs)
        args32, kwargs32 = as_float32(args), as_float32(kwargs)
        with self._float32(), uncompiled():
            base, traces = self._replay(call, args32, kwargs32, record=True)
            check_finite(base, f"decoder layer {self.index}", self.finder.model_type)
            if not stream or base.ndim != 3 or arg_at(args32, kwargs32, stream[0]).shape != base.shape:
                raise UserError(
                    f"decoder layer {self.index} of {self.finder.model_type} returns a hidden state shaped "
                    f"{tuple(base.shape)} unlike its input: several parallel residual streams are not supported"
                )
            self.finder.width = base.shape[-1]
            writers = self._find(call, args32, kwargs32, base, traces)
            writers = self._prove(call, args32, kwargs32, base, stream, writers, traces)
        self.finder.found.update({w.path: w for w in writers})
        out = call(*args, **kwargs)
        self.finder.stream.append(array_of(out))
        return out

    @contextlib.contextmanager
    def _float32(self) -> Iterator[None]:
        saved = flat_params(self.layer.parameters())
        if any(v.dtype in (mx.float16, mx.bfloat16) for _, v in saved):
            self.layer.set_dtype(mx.float32)
        try:
            yield
        finally:
            self.layer.update(unflatten(saved))

    def _replay(
        self,
        call: Call,
        args: Args,
        kwargs: Kwargs,
        extra: Sequence[tuple[nn.Module, Hook]] = (),
        record: bool = False,
    ) -> tuple[mx.array, Traces]:
        traces: Traces = {}
        pairs = [(m, recorder(traces, p)) for p, m in self.modules if record and not has_children(m)]
        with hooks(list(extra) + pairs):
            out = array_of(call(*args, **kwargs))
            mx.eval(out)
        return out, traces

    def _candidates(self, traces: Traces, size: int) -> list[tuple[str, nn.Module]]:
        out = []
        for path, module in self.modules:
            trace = traces.get(path)
            y = trace and first_array(trace[2])
            if (
                y is not None
                and y.shape[-1] == size
                and (isinstance(module, editable_types()) or norm_like(module, size))
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
        basis = orthonormal(self.finder.next_key(), len(candidates), size)
        reference, _ = self._replay(call, args, kwargs, [(m, projector(basis)) for _, m in candidates])
        scales = typical_norms([traces[path] for path, _ in candidates])
        # basis[i, :], not basis[i]: MLX runs a lone integer index as a gather (a kernel its CUDA backend
        # compiles with NVRTC at first use, ~3 s), an index tuple as a slice
        nudged = [
            (m, projector(basis, nudge=scale * basis[i, :]))
            for i, ((_, m), scale) in enumerate(zip(candidates, scales))
        ]
        out, _ = self._replay(call, args, kwargs, nudged)
        moved = float_list(mx.abs((out - reference).astype(mx.float32).reshape(-1, size) @ basis.T).max(axis=0))
        return [c for c, m, scale in zip(candidates, moved, scales) if m > 1e-3 * scale]

    def _feeding(
        self, call: Call, args: Args, kwargs: Kwargs, traces: Traces, sink: tuple[str, nn.Module]
    ) -> list[tuple[str, nn.Module]]:
        """Modules whose output is ``sink``'s input as it is (what a post-norm normalizes)."""
        sink_base = array_of(traces[sink[0]][0])
        size = sink_base.shape[-1]
        found = []
        for path, module in self._candidates(traces, size):
            if module is sink[1]:
                continue
            v = random_unit(self.finder.next_key(), size)
            seen: dict = {}
            self._replay(
                call,
                args,
                kwargs,
                [(module, nudger(typical_norm(traces[path]) * v)), (sink[1], recorder(seen, "sink"))],
            )
            moved = first_array(seen["sink"][0]) if "sink" in seen else None
            if moved is not None and moved.shape == sink_base.shape and moves_along(moved - sink_base, v):
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
        if isinstance(module, editable_types()):
            writers.setdefault(path, Writer(path, branch_role(path), self.index, rows=False, norm=norm, gain=gain))
            return
        if depth >= 4:
            return
        call, args, kwargs, traces = replay
        width = self.finder.width
        assert width is not None, "run() sets the width before resolving writers"
        g = norm_gain(module, width)
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
        r = random_unit(self.finder.next_key(), base.shape[-1])
        residual = self._residual(call, args, kwargs, stream, writers, r)
        if residual <= PROOF_TOLERANCE:
            return writers
        have = {w.path for w in writers}
        extra = [
            Writer(p, branch_role(p), self.index, rows=False)
            for p, m in self._candidates(traces, base.shape[-1])
            if p not in have and isinstance(m, editable_types())
        ]
        kept = smallest_passing(writers, extra, lambda ws: self._residual(call, args, kwargs, stream, ws, r))
        if kept is not None:
            return _with_siblings(kept, self.modules)
        found = ", ".join(short_path(w.path, self.index) for w in writers) or "none"
        others = ", ".join(
            short_path(p, self.index) for p, _ in self._candidates(traces, base.shape[-1]) if p not in have
        )
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
            value = arg_at(args, kwargs, position)
            args, kwargs = with_arg(args, kwargs, position, value - (value @ r)[..., None] * r)
        clean = arg_at(args, kwargs, stream[0])
        out, _ = self._replay(call, args, kwargs, [(by_path[w.path], projector(w.direction(r))) for w in writers])
        return proof_residual(out - clean, r)


def smallest_passing(
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


def has_children(module: nn.Module) -> bool:
    return any(
        isinstance(v, (nn.Module, list, dict)) and (not isinstance(v, (list, dict)) or _holds_module(v))
        for v in module.values()
    )


def _holds_module(value: list | dict) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(x, nn.Module) or (isinstance(x, (list, dict)) and _holds_module(x)) for x in items)


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
        if w is not None and path not in have and isinstance(module, editable_types()):
            out.append(Writer(path, w.role, w.layer, w.rows, w.norm, w.gain))
            have.add(path)
    return out


def _hidden_input(args: Args, kwargs: Kwargs, out: mx.array) -> mx.array | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, mx.array) and value.shape == out.shape:
            return value
    return None
