"""Did abliteration work, and what did it cost? One model's evaluation report.

- Refusal rate: greedy answers to held-out prompts, judged by the marker rule (``refusals``).
- Damage: KL(original ‖ edited) on harmless prompts (``kl``).
- Capability: exact-answer questions asked before and after (``capability``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.evaluation.capability import capability_rows
from mlx_abliteration.evaluation.generation import DEFAULT_BATCH_SIZE, greedy_tokens, strip_eos
from mlx_abliteration.evaluation.kl import ReferenceLogprobs, kl_all_and_first, kl_divergence, reference_logprobs
from mlx_abliteration.evaluation.refusals import (
    DEFAULT_REFUSAL_MARKERS,
    answer_verdict,
    contains_refusal_marker,
    split_thinking,
)
from mlx_abliteration.probe.batching import Progress

if TYPE_CHECKING:
    import mlx.nn as nn


@dataclass
class EvalReport:
    harmful_refusals: int
    harmful_total: int
    harmless_refusals: int | None
    harmless_total: int
    kl: float | None
    kl_tokens: int
    tokens_per_s: float
    seconds: float
    kl_first_token: float | None = None  # with ``kl_tokens`` > 1: the KL at each answer's first position alone
    generated_tokens: int = 0
    responses: list[dict] = field(default_factory=list)
    # answers still inside their thinking block when the token budget ran out (not counted as either)
    harmful_unfinished: int = 0
    harmless_unfinished: int = 0
    # core.capability: per question, whether the answer was right (None: not asked)
    capability_correct: list[bool] | None = None
    # evaluation.judge (--judge MODEL): the judge's name, its refusal and undecided counts, on how many of the
    # answers both verdicts exist (``judge_compared``) it agrees with the keyword verdict (``judge_agreed``),
    # and its measured quality on the held-out hand labels (``JudgeQuality.summary``)
    judge: str | None = None
    harmful_judge_refusals: int | None = None
    harmless_judge_refusals: int | None = None
    harmful_judge_undecided: int | None = None
    harmless_judge_undecided: int | None = None
    judge_agreed: int | None = None
    judge_compared: int | None = None
    judge_quality: dict | None = None

    @property
    def harmful_refusal_rate(self) -> float:
        return self.harmful_refusals / self.harmful_total if self.harmful_total else 0.0

    @property
    def harmless_refusal_rate(self) -> float | None:
        if self.harmless_refusals is None or not self.harmless_total:
            return None
        return self.harmless_refusals / self.harmless_total

    def to_dict(self, include_responses: bool = False) -> dict:
        data = asdict(self)
        if not include_responses:
            data.pop("responses")
        data["harmful_refusal_rate"] = self.harmful_refusal_rate
        data["harmless_refusal_rate"] = self.harmless_refusal_rate
        return data


class ReferenceMismatch(ValueError):
    """The reference log-probs belong to other prompts or another tokenizer than the model evaluated."""


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    *,
    max_tokens: int = 64,
    batch_size: int = DEFAULT_BATCH_SIZE,
    system_prompt: str | None = None,
    reference_logprobs: ReferenceLogprobs | None = None,
    markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS,
    kl_tokens: int = 1,
    progress: Progress | None = None,
    stop_at_refusal: bool = False,
    count_harmless_refusals: bool = True,
    capability_questions: int = 0,
    first_logprobs: list | None = None,
) -> EvalReport:
    """Refusals on harmful and harmless prompts, and KL against ``reference_logprobs`` if given.

    ``stop_at_refusal`` ends an answer as soon as a marker appears (same
    counts, shorter responses; what a search wants). ``kl_tokens`` is taken
    from the reference when one is given. A one-token KL reads the harmless
    answers' first-token distributions (no pass of its own); ``first_logprobs``,
    a list, receives them (``[1, V]`` rows in prompt order) to serve as a later reference.
    """
    if reference_logprobs is not None and (
        encode_chats(tokenizer, harmless_prompts, system_prompt) != reference_logprobs.token_lists
    ):
        raise ReferenceMismatch("the reference log-probs were computed on other prompts or with another tokenizer")
    start = time.perf_counter()
    generator = _RefusalCounter(
        model, tokenizer, max_tokens, batch_size, system_prompt, markers, stop_at_refusal, progress
    )
    responses = generator.run(harmful_prompts, "harmful")
    harmless_refusals = None
    firsts: list = []
    if reference_logprobs is not None:
        kl_tokens = reference_logprobs.kl_tokens
    if count_harmless_refusals and harmless_prompts:
        wanted = kl_tokens == 1 and (reference_logprobs is not None or first_logprobs is not None)
        responses += generator.run(harmless_prompts, "harmless", firsts if wanted else None)
        harmless_refusals = sum(r["refusal"] is True for r in responses if r["kind"] == "harmless")
    capability = None
    if capability_questions > 0:
        rows = capability_rows(
            model,
            tokenizer,
            capability_questions,
            batch_size=batch_size,
            system_prompt=system_prompt,
            progress=progress,
        )
        responses += rows
        capability = [r["correct"] for r in rows]

    kl = kl_first = None
    if reference_logprobs is not None and firsts:
        kl = kl_divergence(reference_logprobs.logprobs, mx.concatenate(firsts))
    elif reference_logprobs is not None:
        kl, kl_first = kl_all_and_first(model, reference_logprobs, batch_size, progress)
    if first_logprobs is not None:
        first_logprobs.extend(firsts)
    return EvalReport(
        harmful_refusals=sum(r["refusal"] is True for r in responses if r["kind"] == "harmful"),
        harmful_unfinished=sum(r["refusal"] is None for r in responses if r["kind"] == "harmful"),
        harmless_unfinished=sum(r["refusal"] is None for r in responses if r["kind"] == "harmless"),
        harmful_total=len(harmful_prompts),
        harmless_refusals=harmless_refusals,
        harmless_total=len(harmless_prompts),
        kl=kl,
        kl_tokens=kl_tokens,
        kl_first_token=kl_first if kl_tokens > 1 else None,
        tokens_per_s=generator.tokens / generator.seconds if generator.seconds else 0.0,
        seconds=time.perf_counter() - start,
        generated_tokens=generator.tokens,
        responses=responses,
        capability_correct=capability,
    )


def eval_settings(
    *,
    max_tokens: int,
    kl_tokens: int,
    batch_size: int,
    system_prompt: str | None,
    markers: Sequence[str],
    capability_questions: int = 0,
    judge: str | dict = "keywords",
) -> dict:
    """Every setting an evaluation depends on (the baseline cache's key; ``evaluate_original``'s input).
    ``judge``: ``judge.judge_identity`` (the judging itself is a step of its own, after the answers)."""
    return {
        "judge": judge,
        "capability_questions": capability_questions,
        "max_tokens": max_tokens,
        "kl_tokens": kl_tokens,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "markers": list(markers),
    }


def evaluate_original(
    model: nn.Module,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    settings: dict,
    progress: Progress | None = None,
) -> tuple[ReferenceLogprobs, EvalReport]:
    """``(reference, report)`` of the unedited model: the reference log-probs for KL, and its answers."""

    if settings["kl_tokens"] == 1 and harmless_prompts:  # the reference comes with the harmless answers
        firsts: list = []
        report = _evaluate_with(model, tokenizer, harmful_prompts, harmless_prompts, settings, progress, firsts)
        token_lists = encode_chats(tokenizer, harmless_prompts, settings["system_prompt"])
        return ReferenceLogprobs(token_lists, [[] for _ in token_lists], mx.concatenate(firsts), 1), report
    reference = reference_logprobs(
        model,
        tokenizer,
        harmless_prompts,
        kl_tokens=settings["kl_tokens"],
        batch_size=settings["batch_size"],
        system_prompt=settings["system_prompt"],
        progress=progress,
    )
    return reference, _evaluate_with(model, tokenizer, harmful_prompts, harmless_prompts, settings, progress)


def _evaluate_with(
    model: nn.Module,
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    settings: dict,
    progress: Progress | None,
    first_logprobs: list | None = None,
) -> EvalReport:
    return evaluate_model(
        model,
        tokenizer,
        harmful_prompts,
        harmless_prompts,
        max_tokens=settings["max_tokens"],
        batch_size=settings["batch_size"],
        system_prompt=settings["system_prompt"],
        markers=settings["markers"],
        kl_tokens=settings["kl_tokens"],
        progress=progress,
        capability_questions=settings.get("capability_questions", 0),
        first_logprobs=first_logprobs,
    )


class _RefusalCounter:
    """Generates answers for one prompt set at a time and keeps token/time totals."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_tokens: int,
        batch_size: int,
        system_prompt: str | None,
        markers: Sequence[str],
        stop_at_refusal: bool,
        progress: Progress | None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.system_prompt, self.markers = system_prompt, tuple(markers)
        self.stop_at_refusal, self.progress = stop_at_refusal, progress
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.tokens, self.seconds = 0, 0.0

    def run(self, prompts: Sequence[str], kind: str, first_logprobs: list | None = None) -> list[dict]:
        token_lists = encode_chats(self.tokenizer, prompts, self.system_prompt)

        def stop(index: int, tokens: list[int]) -> bool:
            answer = split_thinking(self.tokenizer.decode(strip_eos(tokens, self.eos)))[0]
            return answer is not None and contains_refusal_marker(answer, self.markers, prompts[index])

        start = time.perf_counter()
        outputs = greedy_tokens(
            self.model,
            token_lists,
            self.max_tokens,
            self.batch_size,
            self.eos,
            None,
            self.progress,
            kind,
            row_stop=stop if self.stop_at_refusal else None,
            first_logprobs=first_logprobs,
        )
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(t) for t in outputs)
        texts = [self.tokenizer.decode(strip_eos(t, self.eos)) for t in outputs]
        return [_response(kind, p, text, self.markers) for p, text in zip(prompts, texts)]


def _response(kind: str, prompt: str, text: str, markers: Sequence[str]) -> dict:
    """One evaluation row; answers with a thinking block also carry the answer part and whether it ended.
    ``refusal`` is None for an answer that never left its thinking block."""
    row = {"kind": kind, "prompt": prompt, "response": text, "refusal": answer_verdict(text, markers, prompt)}
    answer, thinking = split_thinking(text)
    if thinking:
        row["answer"] = answer
        row["thinking_finished"] = answer is not None
    return row
