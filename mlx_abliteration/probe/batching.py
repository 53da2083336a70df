"""Batched forward passes over prompts of different lengths (left padding).

One implementation used by probing and evaluation: prompts are left-padded and
each layer gets mlx-lm's batch KV cache, whose mask hides the padding and whose
per-row offsets give every real token the same position (RoPE) it would have
unbatched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn


# Tokens a batch KV cache grows by (mlx-lm's default is 256). An evaluation
# batch holds ~50 prompt + 64 answer tokens per row: at 256 most of the cache
# was never written (1.0 GB of 1.1 for 64 rows of Qwen2.5-1.5B in float32).
KV_CACHE_STEP = 64


def small_steps(caches: list[Any]) -> list[Any]:
    """``caches`` with each plain ``BatchKVCache`` growing by ``KV_CACHE_STEP`` tokens (sliding windows keep theirs)."""
    from mlx_lm.models.cache import BatchKVCache

    for cache in caches:
        if type(cache) is BatchKVCache:
            cache.step = KV_CACHE_STEP
    return caches


class BatchingUnsupported(Exception):
    """The model's cache types have no batched (left-padded) equivalent."""


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[mx.array, list[int]]:
    """Return ``(tokens[B, T], left_padding[B])`` as MLX arrays / list; ``T`` rounded up to ``multiple``."""

    width = round_up(max(len(t) for t in token_lists), multiple)
    padding = [width - len(t) for t in token_lists]
    rows = [[pad_id] * p + list(t) for p, t in zip(padding, token_lists)]
    return mx.array(rows, dtype=mx.int32), padding


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (a padded batch width)."""
    return -(-n // max(1, multiple)) * max(1, multiple)


def make_batch_cache(model: nn.Module, left_padding: list[int]) -> list[Any]:
    """Per-layer batch caches matching the model's own cache types."""
    from mlx_lm.models.cache import (
        BatchKVCache,
        BatchRotatingKVCache,
        KVCache,
        RotatingKVCache,
        make_prompt_cache,
    )

    caches: list[BatchKVCache | BatchRotatingKVCache] = []
    for cache in make_prompt_cache(model):
        if type(cache) is KVCache:
            caches.append(BatchKVCache(left_padding))
        elif type(cache) is RotatingKVCache:
            caches.append(BatchRotatingKVCache(cache.max_size, left_padding))
        else:
            raise BatchingUnsupported(type(cache).__name__)
    return small_steps(caches)


def length_sorted_batches(n_items: int, lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length (less padding), in a deterministic order."""
    order = sorted(range(n_items), key=lambda i: (lengths[i], i))
    for start in range(0, n_items, batch_size):
        yield order[start : start + batch_size]


def make_cache(model: nn.Module, left_padding: list[int]) -> list[Any]:
    """Batch caches; a single row of a model without batch caches gets its own cache."""
    from mlx_lm.models.cache import make_prompt_cache

    try:
        return make_batch_cache(model, left_padding)
    except BatchingUnsupported:
        if len(left_padding) == 1:
            return make_prompt_cache(model)
        raise


def batching_supported(model: nn.Module) -> bool:
    try:
        make_batch_cache(model, [0, 0])
    except BatchingUnsupported:
        return False
    return True


def prefill(
    model: nn.Module, token_lists: Sequence[Sequence[int]], n_logits: int = 1, pad_id: int = 0
) -> tuple[mx.array, list[Any]]:
    """Run a left-padded batch; return logits ``[B, n_logits, V]`` of its last positions and the caches.

    The earlier positions only fill the caches (their logits are never
    evaluated, so the vocabulary projection runs on ``n_logits`` positions).
    The caches continue the batch one token at a time: ``model(tokens[B, 1], cache=caches)``.
    """

    tokens, padding = left_pad(token_lists, pad_id)
    cache = make_cache(model, padding)
    n_logits = min(n_logits, tokens.shape[1])
    if tokens.shape[1] > n_logits:
        model(tokens[:, :-n_logits], cache=cache)
        mx.eval([c.state for c in cache])
    return model(tokens[:, -n_logits:], cache=cache), cache


# Progress callback: (done, total, what).
Progress = Callable[[int, int, str], None]


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis (the one normalization of logits everywhere)."""

    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
