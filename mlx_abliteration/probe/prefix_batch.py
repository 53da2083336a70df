"""Batched prefill that runs the prefix shared by every prompt only once.

Chat prompts open with the same template tokens (Qwen2.5's default system
prompt is ~30 of a ~48-token prompt). ``shared_prefill`` runs that prefix
once, gives every row a copy of its KV cache, and runs only the rest of each
prompt in two batched passes: every token but the last, right-padded (causal
attention keeps the padding invisible to real tokens; mlx-lm's
``BatchKVCache.finalize`` then rolls it to the left), and the last tokens as
one decoding step, so the output head runs on one position per row. Rows
are grouped by length where padding would cost more than another pass.
Results equal ``batching.prefill`` to float tolerance (the matmul shapes
differ); a search trial's prefill costs 2-3x less.

Models whose caches are not plain ``KVCache`` (sliding windows, SSMs) and
prompts without a common prefix use the plain prefill.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.probe.batching import Progress, batching_supported, log_softmax, prefill, small_steps

# Padding tokens a length group may carry before a second group is cheaper:
# a pass over few tokens costs about as much as ~128 tokens of compute (it
# reads every weight once; Qwen2.5-1.5B in float32 on a 2-core CPU).
PADDING_ALLOWANCE = 128


def common_prefix_length(token_lists: Sequence[Sequence[int]], limit: int) -> int:
    """Leading tokens every list starts with, at most ``limit``.

    Callers set the limit their use needs: the prefill keeps at least one
    token of each prompt after the prefix, the probe stops before the first
    probed position.
    """
    first = token_lists[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def prefill_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """The shared prefix the prefill runs once: it leaves at least one token of each prompt after it."""
    return common_prefix_length(token_lists, min(len(t) for t in token_lists) - 1)


def plain_kv_caches(model: nn.Module) -> list[Any] | None:
    """Fresh per-layer caches of ``model`` if all are plain ``KVCache`` (no sliding window, no SSM state), else None."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    return caches if all(type(c) is KVCache for c in caches) else None


def prefix_kv_cache(
    model: nn.Module, prefix: Sequence[int], stop: type[Exception] | None = None
) -> tuple[list[Any], mx.array | None] | None:
    """Per-layer KV caches holding ``prefix`` after one forward pass, and that pass's (unevaluated) output.

    None if the model's caches are not plain ``KVCache`` (sliding windows,
    SSMs). ``stop``: an exception the forward pass may end with on purpose
    (the probe stops after its deepest layer); the output is then None and
    the deeper layers' caches stay empty.
    """
    caches = plain_kv_caches(model)
    if caches is None:
        return None
    stops: tuple[type[Exception], ...] = (stop,) if stop is not None else ()
    out = None
    try:
        out = model(mx.array([list(prefix)]), cache=caches)
    except stops:
        pass
    mx.eval([(c.keys, c.values) for c in caches if c.keys is not None])
    return caches, out


def shared_prefill(
    model: nn.Module, token_lists: Sequence[Sequence[int]], with_cache: bool = True
) -> tuple[mx.array, list[Any] | None]:
    """Like ``batching.prefill(model, token_lists)``: last-position logits ``[B, 1, V]`` and batch caches.

    ``with_cache=False`` skips assembling the caches (first-token log-probs only).
    """
    from mlx_lm.models.cache import BatchKVCache

    n_prefix = prefill_prefix_length(token_lists)
    prefix = prefix_kv_cache(model, token_lists[0][:n_prefix]) if len(token_lists) > 1 and n_prefix > 0 else None
    if prefix is None:
        return prefill(model, token_lists)
    prefix_cache, out = prefix
    assert out is not None, "no stop exception was given"
    suffixes = [list(t[n_prefix:]) for t in token_lists]
    last: list = [None] * len(suffixes)
    rows: list = [None] * len(suffixes)
    for chunk in length_groups([len(s) for s in suffixes]):
        logits, caches = _suffix_prefill(model, prefix_cache, [suffixes[i] for i in chunk])
        for j, i in enumerate(chunk):
            last[i] = logits[j : j + 1]  # a slice (logits[j] would be a gather: see _suffix_prefill)
            if with_cache:
                rows[i] = [c.extract(j) for c in caches]
    cache = None
    if with_cache:
        cache = small_steps([BatchKVCache.merge([row[layer] for row in rows]) for layer in range(len(prefix_cache))])
    return mx.concatenate(last)[:, None, :], cache


def length_groups(lengths: list[int], allowance: int = PADDING_ALLOWANCE) -> Iterator[list[int]]:
    """Row indices sorted by length, cut where a group's padding would exceed ``allowance`` tokens."""
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if group and (len(group) + 1) * lengths[i] - (real + lengths[i]) > allowance:
            yield group
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    if group:
        yield group


def _suffix_prefill(model: nn.Module, prefix_cache: list[Any], suffixes: list[list[int]]) -> tuple[mx.array, list[Any]]:
    """Logits after each suffix ``[B, V]`` and the batch caches (left-padded, ready to decode)."""
    from mlx_lm.models.cache import BatchKVCache

    bodies = [s[:-1] for s in suffixes]
    width = max(len(b) for b in bodies)
    caches = small_steps([BatchKVCache.merge([c] * len(suffixes)) for c in prefix_cache])
    if width > 0:  # all but the last tokens only fill the caches: their logits are never evaluated
        for c in caches:
            c.prepare(right_padding=[width - len(b) for b in bodies])
        model(mx.array([b + [0] * (width - len(b)) for b in bodies], dtype=mx.int32), cache=caches)
        for c in caches:
            c.finalize()
        mx.eval([c.state for c in caches])
    # The last tokens as one decoding step: the output head runs on one position per row
    # (no per-row pick: MLX runs logits[arange(B), lengths] as a gather, which its CUDA backend
    # compiles with NVRTC at first use, ~3 s on an H200).
    logits = model(mx.array([[s[-1]] for s in suffixes], dtype=mx.int32), cache=caches)[:, -1, :]
    mx.eval(logits)
    return logits, caches


def shared_first_token_logprobs(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> mx.array:
    """Log-softmax (float32) of the next-token distribution after each prompt: ``[N, V]``.

    Equals the plain batched prefill's (``batching.prefill``) to float tolerance, with the shared prefix
    run once per batch (``generation.first_token_logprobs`` and the KL's one-token case come here).
    """
    batch_size = batch_size or len(token_lists)
    if not batching_supported(model):
        batch_size = 1  # caches without a batched form: one prompt at a time, no padding
    out = []
    for start in range(0, len(token_lists), batch_size):
        logits, _ = shared_prefill(model, token_lists[start : start + batch_size], with_cache=False)
        logits = logits[:, -1, :].astype(mx.float32)
        out.append(log_softmax(logits))
        if progress is not None:
            mx.eval(out[-1])
            progress(min(start + batch_size, len(token_lists)), len(token_lists), "log-probs")
    result = mx.concatenate(out)
    mx.eval(result)
    return result
