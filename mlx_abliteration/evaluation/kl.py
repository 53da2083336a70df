"""Damage: KL(original ‖ edited) of next-token distributions, from the original's log-probs kept before the model is edited in place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.evaluation.generation import DEFAULT_BATCH_SIZE, continuation_logprobs, greedy_tokens
from mlx_abliteration.probe.batching import Progress
from mlx_abliteration.runtime.mx_types import scalar

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn


def kl_rows(logp_ref: mx.array, logp_new: mx.array) -> mx.array:
    """KL(ref ‖ new) = Σ p_ref (log p_ref − log p_new) of each row of log-probs ``[N, V]``: ``[N]``."""
    logp_ref = logp_ref.astype(mx.float32)
    logp_new = logp_new.astype(mx.float32)
    p_ref = mx.exp(logp_ref)
    terms = mx.where(p_ref > 0, p_ref * (logp_ref - logp_new), 0.0)
    return mx.sum(terms, axis=-1)


def kl_divergence(logp_ref: mx.array, logp_new: mx.array) -> float:
    """Mean over rows of KL(ref ‖ new), rows of log-probs ``[N, V]``."""
    return scalar(mx.mean(kl_rows(logp_ref, logp_new)))


@dataclass
class ReferenceLogprobs:
    """The original model's next-token log-probs on harmless prompts, cached before editing.

    ``continuations`` are the original's own greedy tokens (``kl_tokens`` of
    them, fewer if it stopped); the edited model is scored on the same tokens.
    """

    token_lists: list[list[int]]
    continuations: list[list[int]]
    logprobs: mx.array  # [rows, V]
    kl_tokens: int


def reference_logprobs(
    model: nn.Module,
    tokenizer: Any,
    harmless_prompts: Sequence[str],
    *,
    kl_tokens: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    system_prompt: str | None = None,
    progress: Progress | None = None,
) -> ReferenceLogprobs:
    """Cache the (original) model's log-probs for the KL of a later, edited model."""

    token_lists = encode_chats(tokenizer, harmless_prompts, system_prompt)
    if kl_tokens > 1:
        eos = frozenset(tokenizer.eos_token_ids)
        continuations = greedy_tokens(
            model, token_lists, kl_tokens, batch_size, eos, progress=progress, what="reference"
        )
    else:
        continuations = [[] for _ in token_lists]
    logprobs = continuation_logprobs(model, token_lists, continuations, batch_size, progress)
    mx.eval(logprobs)
    return ReferenceLogprobs(token_lists, continuations, logprobs, max(1, kl_tokens))


def kl_from_reference(
    model: nn.Module,
    reference: ReferenceLogprobs,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> float:
    return kl_divergence(reference.logprobs, edited_logprobs(model, reference, batch_size, progress))


def kl_all_and_first(
    model: nn.Module,
    reference: ReferenceLogprobs,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> tuple[float, float]:
    """The KL over every reference position, and over each prompt's first position alone (the first-token
    KL other tools report), from one pass."""
    rows = kl_rows(reference.logprobs, edited_logprobs(model, reference, batch_size, progress))
    starts, at = [], 0
    for continuation in reference.continuations:
        starts.append(at)
        at += max(1, len(continuation))
    return scalar(mx.mean(rows)), scalar(mx.mean(rows[mx.array(starts)]))


def edited_logprobs(
    model: nn.Module,
    reference: ReferenceLogprobs,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> mx.array:
    """The (edited) model's log-probs at the reference's positions, row for row."""
    return continuation_logprobs(model, reference.token_lists, reference.continuations, batch_size, progress)
