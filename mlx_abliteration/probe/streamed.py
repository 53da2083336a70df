"""Layer-streamed probing: models whose weights do not fit in memory.

The model is opened lazily (``mx.load`` reads a tensor only when it is
evaluated) and the residual stream is computed one decoder layer at a time:
pass ``k`` runs the model's own forward pass for every batch, with layers
before ``k - 1`` skipped, layer ``k - 1`` replaying its stored output and
layer ``k`` running for real; the forward stops after layer ``k``. So the
model's own embedding, masks and per-layer arguments are used unchanged,
only layer ``k``'s weights are resident, and they are released before layer
``k + 1`` is read. Memory: one layer's weights plus the hidden states of all
probe prompts (prompts x tokens x hidden x 4 bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.batching import batching_supported, left_pad, make_batch_cache
from mlx_abliteration.probe.capture import (
    Progress,
    StopForward,
    WelfordStats,
    auto_batch_size,
    decoder_layers,
    encode_for_probe,
    owned_layer_list,
    position_selector,
)
from mlx_abliteration.probe.directions import RefusalDirections, candidate_layers
from mlx_abliteration.probe.positions import ProbeSpec
from mlx_abliteration.runtime.mx_types import flat_params

_SKIP, _REPLAY, _RUN = "skip", "replay", "run"


class _StreamedLayer(nn.Module):
    """A decoder layer that is skipped, replays a stored output, or runs.

    The layer sits on an underscore attribute so its weights are not part of
    ``model.parameters()`` (the non-layer weights are reset apart from them).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._layer = layer
        self._mode = _SKIP
        self._replay: mx.array | None = None
        self._output: mx.array | None = None

    def __getattr__(self, name: str) -> Any:
        # The model's forward reads plain attributes of its layers (use_sliding...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self._layer, name)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        if self._mode == _SKIP:
            return x
        if self._mode == _REPLAY:
            return self._replay
        out = self._layer(x, *args, **kwargs)
        if not isinstance(out, mx.array):
            raise UserError("streamed probing needs decoder layers that return one array; use --probe-mode memory")
        self._output = out
        raise StopForward

    def release(self) -> None:
        """Drop this layer's weights (they are never read again)."""
        empty = mx.zeros((0,))
        self._layer.update(tree_map(lambda _: empty, self._layer.parameters()))


@dataclass
class _Batch:
    set_index: int
    tokens: mx.array
    padding: list[int]
    select: Callable[[mx.array], mx.array]  # [B, T, H] -> [B, H]
    hidden: mx.array | None = None  # output of the last completed layer


def _make_batches(
    model: nn.Module,
    tokenizer: Any,
    prompt_sets: Sequence[Sequence[str]],
    spec: ProbeSpec,
    batch_size: int | None,
) -> list[_Batch]:
    """The same length-sorted batches ``probe_prompts`` makes, for every set."""
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    batched = batching_supported(model)
    batches = []
    for set_index, prompts in enumerate(prompt_sets):
        if not prompts:
            raise UserError("no prompts to probe; check the dataset")
        token_lists, positions = encode_for_probe(tokenizer, prompts, spec)
        lengths = [len(t) for t in token_lists]
        size = (batch_size or auto_batch_size(lengths)) if batched else 1
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            tokens, padding = left_pad([token_lists[i] for i in idx], pad_id)
            select = position_selector([positions[i] for i in idx], padding, tokens.shape[1])
            batches.append(_Batch(set_index, tokens, padding, select))
    return batches


def _run_layer(model: nn.Module, wrappers: list[_StreamedLayer], k: int, batch: _Batch) -> mx.array:
    """Output of layer ``k`` for ``batch`` ([B, T, H]), from layer ``k - 1``'s stored output."""
    for j, wrapper in enumerate(wrappers):
        wrapper._mode = _RUN if j == k else _REPLAY if j == k - 1 else _SKIP
    if k > 0:
        wrappers[k - 1]._replay = batch.hidden
    cache = None if batch.tokens.shape[0] == 1 else make_batch_cache(model, batch.padding)
    try:
        model(batch.tokens, cache=cache)
    except StopForward:
        pass
    out, wrappers[k]._output = wrappers[k]._output, None
    if k > 0:
        wrappers[k - 1]._replay = None
    if out is None:
        raise RuntimeError(f"decoder layer {k} was not called by the model's forward pass")
    return out


def _reset_outer_weights(model: nn.Module, model_dir: Path) -> None:
    """Swap the evaluated embedding (and other non-layer weights) for lazy ones."""
    fresh, _, _ = load_model(model_dir, lazy=True)
    outer = {name for name, _ in flat_params(model.parameters())}
    model.update(tree_unflatten([(n, a) for n, a in flat_params(fresh.parameters()) if n in outer]))


def streamed_probe(
    model_dir: str | Path,
    prompt_sets: Sequence[Sequence[str]],
    spec: ProbeSpec = ProbeSpec(),
    layer_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> list[WelfordStats]:
    """Welford statistics per prompt set, like ``probe_prompts``, one layer in memory at a time."""
    model_dir = Path(model_dir)
    model, tokenizer, _ = load_model(model_dir, lazy=True)
    layers = decoder_layers(model)
    layer_ids = sorted(range(len(layers)) if layer_ids is None else layer_ids)
    batches = _make_batches(model, tokenizer, prompt_sets, spec, batch_size)
    wrappers = _wrap_layers(model, max(layer_ids) + 1)
    rows = {layer: n for n, layer in enumerate(layer_ids)}
    per_layer: dict[int, list[WelfordStats]] = {}
    steps, done = (max(layer_ids) + 1) * len(batches), 0
    for k in range(max(layer_ids) + 1):
        sets = [WelfordStats.empty(1, 1) for _ in prompt_sets]
        for batch in batches:
            out = _run_layer(model, wrappers, k, batch)
            captured = batch.select(out).astype(mx.float32)
            mx.eval(out, captured)
            batch.hidden = out
            if k in rows:
                _update(sets, batch.set_index, captured)
            done += 1
            if progress:
                progress(done, steps, f"streamed probe layer {k}")
        if k in rows:
            per_layer[k] = sets
        wrappers[k].release()
        if k == 0:
            _reset_outer_weights(model, model_dir)
        mx.clear_cache()
    return [_stack([per_layer[layer][s] for layer in layer_ids]) for s in range(len(prompt_sets))]


def _wrap_layers(model: nn.Module, count: int) -> list[_StreamedLayer]:
    storage, offset = owned_layer_list(model)
    wrappers = []
    for i in range(count):
        wrapper = _StreamedLayer(storage[offset + i])
        storage[offset + i] = wrapper
        wrappers.append(wrapper)
    return wrappers


def _update(sets: list[WelfordStats], index: int, captured: mx.array) -> None:
    stats = sets[index]
    if stats.count == 0:
        sets[index] = stats = WelfordStats.empty(1, captured.shape[-1])
    stats.update(captured[:, None, :])


def _stack(per_layer: list[WelfordStats]) -> WelfordStats:
    """One [L, H] statistic from single-layer ones (all saw the same prompts)."""
    mean = mx.concatenate([s.mean for s in per_layer])
    m2 = mx.concatenate([s.m2 for s in per_layer])
    return WelfordStats(per_layer[0].count, mean, m2)


def select_layer_by_separation(directions: RefusalDirections) -> int:
    """The candidate layer (25%..80% of depth) whose means separate most.

    Used by ``--use-layer auto`` in streamed mode, where scoring layers by
    forward passes of the ablated model would need the whole model in memory.
    """

    candidates = set(
        candidate_layers(directions.layers, directions.num_model_layers, max_candidates=len(directions.layers))
    )
    return max((s for s in directions.stats if s.layer in candidates), key=lambda s: (s.separation, -s.layer)).layer
