"""Forward passes that capture the residual stream after each decoder layer.

The model's own forward pass runs unchanged (its masks, embedding scaling,
sliding windows...); only ``model.layers`` entries are temporarily wrapped.
Captured vectors are reduced immediately into streaming Welford statistics,
so memory is O(layers x hidden) however many prompts are probed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.batching import BatchingUnsupported, left_pad, make_batch_cache, round_up
from mlx_abliteration.probe.positions import ProbeSpec, probe_positions, resolve_marker
from mlx_abliteration.probe.prefix_batch import common_prefix_length, plain_kv_caches, prefix_kv_cache
from mlx_abliteration.runtime.hooks import hooks

Progress = Callable[[int, int, str], None]


class StopForward(Exception):
    """Raised after the deepest probed layer: the rest of the model is not needed."""


class ActivationProbeWrapper:
    """The probe point of one decoder layer: records its output at the probe positions.

    It is attached with ``hooks`` (the layer object stays where the model keeps
    it), so the layer is seen however the model calls it: positionally, by
    keyword (GPT-J), or from several lists (AFM7). ``_select`` maps the
    layer output ``[B, T, H]`` to ``[B, H]``.
    """

    def __init__(self, layer: nn.Module, stop_after: bool = False):
        self.layer = layer
        self._select: Callable[[mx.array], mx.array] | None = None
        self._captured: mx.array | None = None
        self._stop_after = stop_after

    def __call__(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = call(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if self._select is not None:
            self._captured = self._select(hidden).astype(mx.float32)
        if self._stop_after:
            raise StopForward
        return out


def decoder_layers(model: nn.Module) -> list:
    """The model's list of decoder layers (mlx-lm exposes it as ``model.layers``)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise UserError(
            f"{type(model).__module__} has no decoder layer list (model.layers); this architecture is unsupported"
        )
    return layers


def owned_layer_list(model: nn.Module) -> tuple[list, int]:
    """The list object that stores the decoder layers, and the offset of layer 0.

    ``model.layers`` may be a fresh slice (mlx-lm's pipeline models), so
    wrapping must edit the list the inner model actually iterates.
    """
    first = decoder_layers(model)[0]
    for _, module in model.named_modules():
        for value in module.values():
            if isinstance(value, list):
                for offset, item in enumerate(value):
                    if item is first:
                        return value, offset
    raise UserError(f"cannot locate the decoder layer list of {type(model).__name__}; this architecture is unsupported")


@contextlib.contextmanager
def capture_residual_stream(
    model: nn.Module, layer_ids: Sequence[int], stop_early: bool = True
) -> Iterator[dict[int, ActivationProbeWrapper]]:
    """Probe points on ``layer_ids``; always removed again, also on errors."""
    layers = decoder_layers(model)
    last = max(layer_ids)
    wrappers = {i: ActivationProbeWrapper(layers[i], stop_after=stop_early and i == last) for i in layer_ids}
    with hooks([(w.layer, w) for w in wrappers.values()]):
        yield wrappers


@dataclass
class WelfordStats:
    """Streaming per-layer mean and total variance (Chan et al. merge rule)."""

    count: int
    mean: mx.array  # [L, H] float32
    m2: mx.array  # [L] sum of squared distances to the mean

    @classmethod
    def empty(cls, num_layers: int, hidden: int) -> WelfordStats:
        return cls(0, mx.zeros((num_layers, hidden), mx.float32), mx.zeros((num_layers,), mx.float32))

    def merge(self, count: int, mean: mx.array, m2: mx.array) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + (delta * delta).sum(-1) * (self.count * count / total)
        self.count = total

    def update(self, batch: mx.array) -> None:
        """Add ``batch`` of shape [B, L, H]."""
        batch_mean = batch.mean(0)
        batch_m2 = ((batch - batch_mean) ** 2).sum((0, 2))
        self.merge(batch.shape[0], batch_mean, batch_m2)
        mx.eval(self.mean, self.m2)

    @property
    def variance(self) -> mx.array:
        """Mean per-dimension variance per layer."""
        return self.m2 / max(self.count - 1, 1) / self.mean.shape[-1]


def position_selector(positions: list[list[int]], padding: list[int], width: int) -> Callable[[mx.array], mx.array]:
    """[B, T, H] -> [B, H]: mean over each row's (left-padding-shifted) positions."""
    weights = [[0.0] * width for _ in positions]
    for row, (pos, pad) in enumerate(zip(positions, padding)):
        for p in pos:
            weights[row][p + pad] = 1.0 / len(pos)
    w = mx.array(weights, dtype=mx.float32)
    if all(len(p) == 1 for p in positions):
        # A masked sum, not h[rows, index]: MLX's CUDA backend compiles each
        # gather kernel at first use (NVRTC, ~3 s of a fresh machine's probe)
        # while select and sum are prebuilt. Exact (one term per row) and
        # NaN-safe (whatever unread positions hold is never multiplied).
        picked = mx.array([[x > 0 for x in row] for row in weights])[:, :, None]
        return lambda h: mx.where(picked, h, 0).sum(1)
    return lambda h: (h.astype(mx.float32) * w[:, :, None]).sum(1)


def _stack_captured(wrappers: dict[int, ActivationProbeWrapper]) -> mx.array:
    """``[B, L, H]``: what every probe point captured in the last forward pass."""
    captured = []
    for layer in sorted(wrappers):
        value = wrappers[layer]._captured
        if value is None:
            raise RuntimeError(f"the forward pass never reached probed layer {layer}")
        captured.append(value)
    stacked = mx.stack(captured, axis=1)
    mx.eval(stacked)
    return stacked


def _forward_batch(
    model: nn.Module,
    tokens: mx.array,
    padding: list[int],
    wrappers: dict[int, ActivationProbeWrapper],
    positions: list[list[int]],
) -> mx.array:
    for wrapper in wrappers.values():
        wrapper._select = position_selector(positions, padding, tokens.shape[1])
        wrapper._captured = None
    cache = None if tokens.shape[0] == 1 else make_batch_cache(model, padding)
    try:
        model(tokens, cache=cache)
    except StopForward:
        pass
    return _stack_captured(wrappers)


# Measured (bench/batch_sweep.py, bench/gpu_probe_ablate.py): on 2 CPU cores
# (Qwen2.5-1.5B, float32 + OpenBLAS) batches of 16 beat 8 and 32 (36 vs 30
# tok/s); on an H100 (8B, bf16) batch 32 beat 16 and 64 (38k vs 33k/35k tok/s).
_BATCH_TOKENS = {"cpu": 1024, "gpu": 4096}

# On a GPU every new batch shape [B, T] costs a one-time set-up on top of the
# arithmetic (MLX CUDA builds a cuDNN attention graph per shape, new CUDA
# graphs and buffers): on an H200 (8B, bf16) a batch of a new shape took
# 0.10-0.14 s against 0.05 s once seen, and the 512-prompt probe of a fresh
# process (20 length-sorted batches, 20 shapes) 2.5-2.7 s against 1.3 s in a
# warm one. So on a GPU batch sizes are powers of two and padded widths
# multiples of _GPU_PAD_MULTIPLE: 4 shapes there, first pass 1.7 s, warm
# 1.3 s (bench/README.md section 4d). The padding is never read (masked, or
# after the last token of a causal model), so results equal unbucketed ones to
# float tolerance. The CPU has no such per-shape cost and pays for every padded
# token: no rounding there.
_GPU_PAD_MULTIPLE = 32


def _on_gpu() -> bool:
    return mx.default_device() != mx.cpu


def pad_multiple(bucket: bool | None = None) -> int:
    """Multiple that a padded batch width is rounded up to: ``_GPU_PAD_MULTIPLE`` when bucketing (default: on a GPU)."""
    return _GPU_PAD_MULTIPLE if (_on_gpu() if bucket is None else bucket) else 1


def auto_batch_size(
    lengths: Sequence[int], max_batch_tokens: int | None = None, cap: int = 32, bucket: bool | None = None
) -> int:
    """Batch size so a padded batch holds about ``max_batch_tokens`` tokens (by device).

    When bucketing (default: on a GPU) it is rounded up to a power of two (at
    most ``cap``), so prompt sets of similar lengths share batch shapes.
    """
    if max_batch_tokens is None:
        max_batch_tokens = _BATCH_TOKENS["gpu" if _on_gpu() else "cpu"]
    longest = max(lengths) if lengths else 1
    size = max(1, min(cap, max_batch_tokens // max(longest, 1)))
    if _on_gpu() if bucket is None else bucket:
        size = min(max(cap, 1), 1 << (size - 1).bit_length())
    return size


# --- shared-prefix probing ---------------------------------------------------------
# Chat-templated prompts start with the same tokens (system prompt, role
# markers): often half of every prompt. Their keys/values are computed once
# and every batch continues from them, right-padded: with a causal model the
# padding after a row's last token cannot change any position that is read.

_MIN_SHARED_PREFIX = 4


def probe_prefix_length(token_lists: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> int:
    """Leading tokens common to every prompt, stopping before the first probed position."""
    return common_prefix_length(token_lists, min(min(p) for p in positions))


def _prefix_caches(model: nn.Module, prefix: Sequence[int], wrappers: dict[int, ActivationProbeWrapper]) -> list | None:
    """Per-layer KV caches holding ``prefix`` (None if the model's caches are not plain KV caches)."""
    for wrapper in wrappers.values():
        wrapper._select = None
    filled = prefix_kv_cache(model, prefix, stop=StopForward)
    return None if filled is None else filled[0]


def _continue_caches(prefix_caches: list[Any], rows: int) -> list[Any]:
    from mlx_lm.models.cache import KVCache

    caches = []
    for source in prefix_caches:
        cache = KVCache()
        if source.keys is not None:
            n = source.offset
            cache.keys = mx.repeat(source.keys[..., :n, :], rows, axis=0)
            cache.values = mx.repeat(source.values[..., :n, :], rows, axis=0)
            cache.offset = n
        caches.append(cache)
    return caches


def _forward_after_prefix(
    model: nn.Module,
    suffixes: list[list[int]],
    positions: list[list[int]],
    prefix_caches: list[Any],
    wrappers: dict[int, ActivationProbeWrapper],
    pad_id: int,
    prefix_len: int,
    multiple: int = 1,
) -> mx.array:
    width = round_up(max(len(s) for s in suffixes), multiple)
    tokens = mx.array([list(s) + [pad_id] * (width - len(s)) for s in suffixes], dtype=mx.int32)
    shifted = [[p - prefix_len for p in pos] for pos in positions]
    for wrapper in wrappers.values():
        wrapper._select = position_selector(shifted, [0] * len(suffixes), width)
        wrapper._captured = None
    try:
        model(tokens, cache=_continue_caches(prefix_caches, len(suffixes)))
    except StopForward:
        pass
    return _stack_captured(wrappers)


def encode_for_probe(
    tokenizer: Any, prompts: Sequence[str], spec: ProbeSpec
) -> tuple[list[list[int]], list[list[int]]]:
    marker = resolve_marker(tokenizer, spec)
    pairs = [probe_positions(tokenizer, p, spec, marker) for p in prompts]
    return [ids for ids, _ in pairs], [pos for _, pos in pairs]


def probe_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: ProbeSpec = ProbeSpec(),
    layer_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    label: str = "probe",
    bucket: bool | None = None,
) -> WelfordStats:
    """Welford statistics of the residual stream after each layer in ``layer_ids``.

    ``bucket``: few batch shapes (power-of-two automatic batch size, widths
    padded to a multiple of 32); default on a GPU, where each new shape costs
    a set-up (see ``_GPU_PAD_MULTIPLE``).
    """
    layers = decoder_layers(model)
    layer_ids = sorted(range(len(layers)) if layer_ids is None else layer_ids)
    token_lists, positions = encode_for_probe(tokenizer, prompts, spec)
    lengths = [len(t) for t in token_lists]
    batch_size = batch_size or auto_batch_size(lengths, bucket=bucket)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    stats = None
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    with capture_residual_stream(model, layer_ids) as wrappers:
        forward = _batch_runner(model, token_lists, positions, wrappers, pad_id, pad_multiple(bucket))
        for start in range(0, len(order), batch_size):
            captured = forward(order[start : start + batch_size])
            if stats is None:
                stats = WelfordStats.empty(len(layer_ids), captured.shape[-1])
            stats.update(captured)
            if progress:
                progress(min(start + batch_size, len(order)), len(order), label)
    if stats is None:
        raise UserError("no prompts to probe; check the dataset")
    return stats


def _batch_runner(
    model: nn.Module,
    token_lists: list[list[int]],
    positions: list[list[int]],
    wrappers: dict[int, ActivationProbeWrapper],
    pad_id: int,
    multiple: int = 1,
) -> Callable[[list[int]], mx.array]:
    """``forward(indices) -> [B, L, H]``: after a shared prefix computed once, else left-padded.

    Each batch's width is rounded up to ``multiple`` (more padding, fewer distinct shapes).
    """
    prefix_len = probe_prefix_length(token_lists, positions) if len(token_lists) > 1 else 0
    prefix = _prefix_caches(model, token_lists[0][:prefix_len], wrappers) if prefix_len >= _MIN_SHARED_PREFIX else None
    if prefix is not None:
        return lambda idx: _forward_after_prefix(
            model,
            [token_lists[i][prefix_len:] for i in idx],
            [positions[i] for i in idx],
            prefix,
            wrappers,
            pad_id,
            prefix_len,
            multiple,
        )

    if plain_kv_caches(model) is None:
        multiple = 1  # sliding-window caches: no padding beyond what the lengths need

    def left_padded(idx: list[int]) -> mx.array:
        # a single row runs without a cache, so without a padding mask: never padded
        tokens, padding = left_pad([token_lists[i] for i in idx], pad_id, multiple if len(idx) > 1 else 1)
        try:
            return _forward_batch(model, tokens, padding, wrappers, [positions[i] for i in idx])
        except BatchingUnsupported:
            return mx.concatenate(
                [_forward_batch(model, mx.array([token_lists[i]]), [0], wrappers, [positions[i]]) for i in idx]
            )

    return left_padded


def capture_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: ProbeSpec = ProbeSpec(),
    layer_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> mx.array:
    """Per-prompt residual vectors [N, L, H] in prompt order (for tests and analysis)."""
    layers = decoder_layers(model)
    layer_ids = sorted(range(len(layers)) if layer_ids is None else layer_ids)
    token_lists, positions = encode_for_probe(tokenizer, prompts, spec)
    batch_size = batch_size or len(prompts)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    out = []
    with capture_residual_stream(model, layer_ids) as wrappers:
        for start in range(0, len(prompts), batch_size):
            batch = token_lists[start : start + batch_size]
            tokens, padding = left_pad(batch, pad_id)
            out.append(_forward_batch(model, tokens, padding, wrappers, positions[start : start + batch_size]))
    return mx.concatenate(out)
