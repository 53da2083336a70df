"""Batched greedy generation and next-token log-probabilities.

Prompts are sorted by length and left-padded (``core.batching``); every row
decodes greedily with the same caches, and finished rows (EOS, or
``stop_when`` true) are dropped from the batch so the remaining rows run
faster. Greedy decoding of a row gives the same tokens as decoding it alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlx_abliteration.config.defaults import GENERATION_BATCH_SIZE as DEFAULT_BATCH_SIZE
from mlx_abliteration.data.chat import generation_budget
from mlx_abliteration.probe.batching import Progress, batching_supported, length_sorted_batches, log_softmax, prefill
from mlx_abliteration.probe.prefix_batch import shared_first_token_logprobs, shared_prefill
from mlx_abliteration.runtime.mx_types import int_list

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

# (model, prompts) -> (last-position logits [B, 1, V], mlx-lm's (untyped) per-layer caches)
Prefill = Callable[["nn.Module", Sequence[Sequence[int]]], tuple["mx.array", Any]]


def greedy_tokens(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    max_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    stop_when: Callable[[list[int]], bool] | None = None,
    progress: Progress | None = None,
    what: str = "generating",
    prefill_fn: Prefill | None = None,
    row_stop: Callable[[int, list[int]], bool] | None = None,
    first_logprobs: list | None = None,
) -> list[list[int]]:
    """Greedy continuations in input order, each ending with its EOS token if one was generated.

    ``stop_when(tokens)`` is called after every new token of a row; when it
    returns True the row stops there. ``row_stop(index, tokens)`` does the
    same knowing which prompt (index into ``token_lists``) the row answers
    (a prompt-aware refusal check). ``progress(done, total, what)`` is
    called whenever rows finish. ``prefill_fn`` replaces
    ``prefix_batch.shared_prefill`` (which runs the chat template's shared
    prefix once; same contract as ``batching.prefill``). ``first_logprobs``,
    a list, receives each prompt's next-token log-probs as a ``[1, V]`` row
    (float32, input order; ``mx.concatenate`` gives ``[N, V]``): the
    distribution the first answer token is picked from, which is what a
    one-token KL compares, at no extra forward pass.
    """

    if not batching_supported(model):
        batch_size = 1
    total = len(token_lists)
    done = 0

    def finished(count: int) -> None:
        nonlocal done
        done += count
        if count and progress is not None:
            progress(done, total, what)

    outputs: list[list[int]] = [[] for _ in token_lists]
    firsts: list = [None] * total
    lengths = [len(t) for t in token_lists]
    for indices in length_sorted_batches(total, lengths, max(1, batch_size)):
        stops: list[Callable[[list[int]], bool] | None] = [stop_when] * len(indices)
        if row_stop is not None:
            stops = [functools.partial(row_stop, i) for i in indices]
        batch, logprobs = _decode_batch(
            model,
            [token_lists[i] for i in indices],
            max_tokens,
            eos_token_ids,
            stops,
            finished,
            prefill_fn or shared_prefill,
            keep_first=first_logprobs is not None,
        )
        for row, (i, tokens) in enumerate(zip(indices, batch)):
            outputs[i] = tokens
            if logprobs is not None:
                firsts[i] = logprobs[row : row + 1]  # a slice: no gather
    if first_logprobs is not None:
        first_logprobs.extend(firsts)
    return outputs


def _decode_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    eos_token_ids: set[int] | frozenset[int],
    stops: Sequence[Callable[[list[int]], bool] | None],
    finished: Callable[[int], None],
    prefill_fn: Prefill = prefill,
    keep_first: bool = False,
) -> tuple[list[list[int]], mx.array | None]:
    """The batch's answers, and (``keep_first``) its first-token log-probs ``[B, V]``."""

    outputs: list[list[int]] = [[] for _ in prompts]
    if max_tokens <= 0 and not keep_first:
        finished(len(prompts))
        return outputs, None
    logits, cache = prefill_fn(model, prompts)
    first = None
    if keep_first:
        first = log_softmax(logits[:, -1, :].astype(mx.float32))
        mx.eval(first)
    if max_tokens <= 0:
        finished(len(prompts))
        return outputs, first
    active = list(range(len(prompts)))  # batch row -> index into prompts
    for step in range(max_tokens):
        next_tokens = mx.argmax(logits[:, -1, :], axis=-1)
        keep = []
        for row, token in enumerate(int_list(next_tokens)):
            out = outputs[active[row]]
            out.append(token)
            stop_when = stops[active[row]]
            if token not in eos_token_ids and (stop_when is None or not stop_when(out)):
                keep.append(row)
        if not keep or step == max_tokens - 1:
            finished(len(active))
            break
        finished(len(active) - len(keep))
        if len(keep) < len(active):
            active = [active[row] for row in keep]
            keep_index = mx.array(keep)
            next_tokens = next_tokens[keep_index]
            for c in cache:
                c.filter(keep_index)
        logits = model(next_tokens[:, None], cache=cache)
    return outputs, first


def strip_eos(tokens: Sequence[int], eos_token_ids: set[int] | frozenset[int]) -> list[int]:
    return list(tokens[:-1]) if tokens and tokens[-1] in eos_token_ids else list(tokens)


def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    token_lists: Sequence[Sequence[int]],
    max_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_when: Callable[[str], bool] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers (text without the EOS token) to already-encoded prompts.

    ``stop_when(text)`` sees a row's text so far after every token; True
    ends that row (the search stops once a refusal marker has appeared).
    """

    max_tokens = generation_budget(tokenizer, token_lists, max_tokens)  # never generate past the context
    eos = frozenset(tokenizer.eos_token_ids)
    token_stop = None
    if stop_when is not None:

        def token_stop(tokens: list[int]) -> bool:
            return stop_when(tokenizer.decode(strip_eos(tokens, eos)))

    outputs = greedy_tokens(model, token_lists, max_tokens, batch_size, eos, token_stop, progress)
    return [tokenizer.decode(strip_eos(tokens, eos)) for tokens in outputs]


def first_token_logprobs(
    model: nn.Module, token_lists: Sequence[Sequence[int]], batch_size: int = DEFAULT_BATCH_SIZE
) -> mx.array:
    """Log-softmax (float32) of the next-token distribution after each prompt: ``[N, V]``."""
    return continuation_logprobs(model, token_lists, [[] for _ in token_lists], batch_size)


def continuation_logprobs(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> mx.array:
    """Next-token log-probs along each prompt's continuation: ``[sum(max(1, len(c))), V]`` float32.

    Row order is prompt by prompt; prompt i contributes the distributions
    predicting its continuation's tokens (the first one right after the
    prompt). An empty continuation contributes just that first distribution.
    The last continuation token is never fed to the model.
    """

    counts = [max(1, len(c)) for c in continuations]
    if max(counts, default=1) == 1:  # next-token distributions only: the shared prefix runs once per batch
        return shared_first_token_logprobs(model, token_lists, batch_size, progress)
    sequences = [list(p) + list(c[:-1]) for p, c in zip(token_lists, continuations)]
    per_prompt: list = [None] * len(sequences)
    if not batching_supported(model):
        batch_size = 1
    lengths = [len(s) for s in sequences]
    done = 0
    for indices in length_sorted_batches(len(sequences), lengths, max(1, batch_size)):
        width = max(counts[i] for i in indices)
        logits, _ = prefill(model, [sequences[i] for i in indices], n_logits=width)
        logprobs = log_softmax(logits.astype(mx.float32))
        for row, i in enumerate(indices):
            per_prompt[i] = logprobs[row, width - counts[i] :]
        mx.eval([per_prompt[i] for i in indices])
        done += len(indices)
        if progress is not None:
            progress(done, len(sequences), "log-probs")
    return mx.concatenate(per_prompt, axis=0)
