"""``--use-layer auto``: pick the direction layer without generating text.

Criterion (after Arditi et al.'s "bypass score", made cheap): find the
model's refusal tokens as the first answer tokens whose probability rises
most from harmless to harmful prompts; then, for each candidate layer in the
middle of the network (25%..80% of depth, where refusal directions are found;
deeper ones tend to damage the model), ablate that layer's direction in
memory, measure the refusal tokens' probability on harmful prompts and the
first-token KL on harmless prompts, and revert. Candidates are a coarse grid
(at most 8 layers) refined at the best one's two neighbours. The chosen layer
minimizes refusal probability + KL. Cost: two first-token forward passes over
a few prompts per candidate, the chat template's shared prefix run once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.edit.orthogonalize import AblationPlan
from mlx_abliteration.edit.trials import Trials
from mlx_abliteration.evaluation.kl import kl_divergence
from mlx_abliteration.probe.batching import Progress
from mlx_abliteration.probe.directions import RefusalDirections, candidate_layers
from mlx_abliteration.probe.prefix_batch import shared_first_token_logprobs as first_token_logprobs
from mlx_abliteration.runtime.mx_types import int_list, scalar

NUM_REFUSAL_TOKENS = 8


@dataclass
class CandidateScore:
    layer: int
    refusal_prob: float  # mean probability of refusal tokens on harmful prompts
    kl: float  # first-token KL on harmless prompts

    @property
    def score(self) -> float:
        return self.refusal_prob + self.kl

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


def refinement_layers(best: int, probed: Sequence[int], scored: set[int]) -> list[int]:
    """The unscored neighbours of the best coarse candidate."""
    return [layer for layer in (best - 1, best + 1) if layer in probed and layer not in scored]


def refusal_token_ids(harmful_logp: mx.array, harmless_logp: mx.array, k: int = NUM_REFUSAL_TOKENS) -> list[int]:
    """Tokens whose mean first-token probability rises most on harmful prompts."""
    rise = mx.exp(harmful_logp).mean(0) - mx.exp(harmless_logp).mean(0)
    top = mx.argsort(-rise)[:k]
    return [t for t in int_list(top) if scalar(rise[t]) > 0]


def token_mask(tokens: Sequence[int], vocab: int) -> mx.array:
    """1.0 at ``tokens``, else 0: summing probabilities through it needs no gather (an NVRTC-compiled kernel on CUDA)."""
    mask = np.zeros(vocab, dtype=np.float32)
    mask[list(tokens)] = 1.0
    return mx.array(mask)


def select_layer_auto(
    model: nn.Module,
    tokenizer: Any,
    directions: RefusalDirections,
    plan_for_layer: Callable[[int], AblationPlan],
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    storage_dtype: mx.Dtype | None = None,
) -> tuple[int, list[CandidateScore]]:
    harmful_ids = encode_chats(tokenizer, harmful_prompts, system_prompt)
    harmless_ids = encode_chats(tokenizer, harmless_prompts, system_prompt)

    def measure() -> tuple[mx.array, mx.array]:
        # Both sets in one batch: each forward pass reads every weight once, so fuller passes cost less per prompt.
        both = first_token_logprobs(model, harmful_ids + harmless_ids, batch_size)
        return both[: len(harmful_ids)], both[len(harmful_ids) :]

    base_harmful, base_harmless = measure()
    tokens = refusal_token_ids(base_harmful, base_harmless)
    candidates = candidate_layers(directions.layers, directions.num_model_layers)
    trials = Trials(model, plan_for_layer(candidates[0]).targets, storage_dtype)
    refusal_mask = token_mask(tokens, base_harmful.shape[-1])

    def score(layer: int) -> CandidateScore:
        harmful, harmless = trials.measure(plan_for_layer(layer), measure)
        refusal = scalar((mx.exp(harmful) * refusal_mask).sum(-1).mean())
        kl = kl_divergence(base_harmless, harmless)
        return CandidateScore(layer, refusal, kl)

    scores: list[CandidateScore] = []
    total = len(candidates) + 2
    for layer in candidates:
        scores.append(score(layer))
        if progress:
            progress(len(scores), total, "auto layer")
    best = min(scores, key=lambda s: (s.score, s.layer))
    for layer in refinement_layers(best.layer, directions.layers, {s.layer for s in scores}):
        scores.append(score(layer))
        if progress:
            progress(len(scores), total, "auto layer")
    if progress:
        progress(total, total, "auto layer")
    scores.sort(key=lambda s: s.layer)
    best = min(scores, key=lambda s: (s.score, s.layer))
    return best.layer, scores
