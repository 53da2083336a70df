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

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.capture import decoder_layers
from mlx_abliteration.probe.layer_probe import LayerProbe, has_children, smallest_passing
from mlx_abliteration.probe.layer_replay import (
    PROOF_TOLERANCE,
    Args,
    Call,
    Hook,
    Kwargs,
    Position,
    StopForward,
    Traces,
    array_of,
    check_finite,
    editable_types,
    first_array,
    moves_along,
    norm_gain,
    norm_like,
    nudger,
    projector,
    proof_residual,
    random_unit,
    recorder,
    stopper,
    table_types,
    typical_norm,
    upcasting,
)
from mlx_abliteration.probe.writers import PROBE_TOKENS, Writer, WriterMap
from mlx_abliteration.runtime.hooks import hooks


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
            probe = LayerProbe(self, index, layer, paths)

            def hook(call: Call, args: Args, kwargs: Kwargs) -> Any:
                out = probe.run(call, args, kwargs)
                mx.eval(array_of(out))
                called.add(index)
                if release is not None:
                    release(index)
                if index == len(layers) - 1:
                    raise StopForward
                return out

            return hook

        try:
            with hooks([(layer, layer_hook(i, layer)) for i, layer in enumerate(layers)]):
                self.model(tokens)
        except StopForward:
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
        stops = [(first_layer, stopper(traces))]
        layer_modules = {
            id(m) for layers in [decoder_layers(self.model)] for layer in layers for _, m in layer.named_modules()
        }
        outside = [(p, m) for p, m in self.model.named_modules() if id(m) not in layer_modules and not has_children(m)]
        self._outside = outside
        self._forward_to_first_layer(tokens, stops + [(m, recorder(traces, p)) for p, m in outside])
        base = traces["__layer0__"]
        check_finite(base, "the embedding", self.model_type)
        size = base.shape[-1]
        self.width = size
        found: list[Writer] = []
        for path, module in outside:
            y = traces.get(path) and first_array(traces[path][2])
            if y is None or y.shape[-1] != size:
                continue
            is_table = isinstance(module, table_types())
            if not (is_table or isinstance(module, editable_types()) or norm_like(module, size)):
                continue
            v = random_unit(self.next_key(), size)
            scale = typical_norm(traces[path])
            seen: dict = {}
            self._forward_to_first_layer(tokens, [(first_layer, stopper(seen)), (module, nudger(scale * v))])
            if not moves_along(seen["__layer0__"] - base, v):
                continue
            if is_table or isinstance(module, editable_types()):
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
        gain = norm_gain(norm, size)
        sink_base = array_of(traces[norm_path][0])
        found = []
        for path, module in outside:
            y = traces.get(path) and first_array(traces[path][2])
            if (
                module is norm
                or y is None
                or y.shape[-1] != size
                or not isinstance(module, table_types() + editable_types())
            ):
                continue
            v = random_unit(self.next_key(), size)
            seen: dict = {}
            self._forward_to_first_layer(
                tokens, [(first_layer, stopper({})), (module, nudger(v)), (norm, recorder(seen, "sink"))]
            )
            if "sink" in seen and moves_along(array_of(seen["sink"][0]) - sink_base, v):
                found.append(
                    Writer(path, "embed", None, rows=isinstance(module, table_types()), norm=norm_path, gain=gain)
                )
        return found

    def _prove_embedding(
        self, found: list[Writer], first_layer: nn.Module, tokens: mx.array, traces: Traces, size: int
    ) -> list[Writer]:
        """``found``, proven; or the smallest set of tables and linear maps that passes (by elimination); or an error.

        The elimination covers tables the nudge test cannot see, e.g. an
        embedding normalized without a gain (nanochat's functional rms_norm).
        """
        r = random_unit(self.next_key(), size)
        residual = self._embedding_residual(found, first_layer, tokens, r)
        if residual <= PROOF_TOLERANCE:
            return found
        have = {w.path for w in found}
        extra = []
        for path, module in self._outside:
            y = traces.get(path) and first_array(traces[path][2])
            if (
                path not in have
                and y is not None
                and y.shape[-1] == size
                and isinstance(module, table_types() + editable_types())
            ):
                extra.append(Writer(path, "embed", None, rows=isinstance(module, table_types())))
        kept = smallest_passing(found, extra, lambda ws: self._embedding_residual(ws, first_layer, tokens, r))
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
            tokens, [(first_layer, stopper(seen))] + [(by_path[w.path], projector(w.direction(r))) for w in writers]
        )
        return proof_residual(seen["__layer0__"], r)

    def _forward_to_first_layer(self, tokens: mx.array, pairs: Sequence[tuple[nn.Module, Hook]]) -> None:
        """The forward pass up to the first layer's input, every module before it computing in float32."""
        hooked = {id(m) for m, _ in pairs}
        pairs = list(pairs) + [(m, upcasting) for _, m in self._outside if id(m) not in hooked]
        try:
            with hooks(pairs):
                self.model(tokens)
        except StopForward:
            return
        raise UserError(
            f"{self.model_type}: the forward pass never called the first decoder layer; this architecture is not supported"
        )


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
