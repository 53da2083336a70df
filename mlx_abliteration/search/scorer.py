"""Scoring one trial: refusals on harmful prompts (generation stops at the first refusal) and KL on harmless ones, stopped early once a finished trial dominates it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.edit.strength_schedule import PlanSpec, kernel_plan
from mlx_abliteration.edit.trials import Trials
from mlx_abliteration.evaluation.generation import greedy_tokens, strip_eos
from mlx_abliteration.evaluation.judge_quality import calibrated_judge
from mlx_abliteration.evaluation.kl import ReferenceLogprobs, edited_logprobs, kl_rows, reference_logprobs
from mlx_abliteration.evaluation.refusals import answer_verdict, contains_refusal_marker, split_thinking
from mlx_abliteration.pipeline.steps import judge_path
from mlx_abliteration.probe.prefix_batch import shared_first_token_logprobs, shared_prefill
from mlx_abliteration.runtime.mx_types import float_list, scalar

if TYPE_CHECKING:
    import mlx.nn as nn

    from mlx_abliteration.evaluation.judge import Judge
    from mlx_abliteration.pipeline.events import Reporter
    from mlx_abliteration.probe.batching import Progress
    from mlx_abliteration.probe.directions import RefusalDirections


@dataclass
class TrialScore:
    refusals: int
    total: int
    kl: float
    seconds: float
    generated_tokens: int
    timings: dict = field(default_factory=dict)  # seconds per phase: apply, kl, generate, restore
    pruned: bool = False  # stopped once dominated; ``refusals`` is then a lower bound
    kl_rows: list[float] = field(default_factory=list)  # per harmless prompt (per token for multi-token KL)


class _Dominated(Exception):
    """Raised inside generation once the refusals so far make the trial dominated."""


class TrialScorer:
    """apply spec -> measure KL, count refusals -> revert; one instance per loaded model.

    Prefill runs the prompts' shared template prefix once (``prefix_batch``);
    the reference log-probs of the unedited model are taken the same way.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        directions: RefusalDirections,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        targets: Sequence[str],
        storage_dtype: mx.Dtype | None = None,
        edited_precision: str | None = None,
        max_tokens: int = 32,
        batch_size: int | None = None,
        system_prompt: str | None = None,
        kl_tokens: int = 1,
        progress: Progress | None = None,
        judge: Judge | None = None,
    ) -> None:
        """``judge``: a loaded ``core.judge.Judge`` that counts the refusals instead of the markers (answers then
        run to ``max_tokens``: no stop at a marker, no stop once dominated)."""

        self.model, self.tokenizer, self.directions = model, tokenizer, directions
        self.targets = tuple(targets)
        self.max_tokens, self.progress = max_tokens, progress
        self.harmful = list(harmful)  # the refusal check ignores marker words copied from the prompt
        self.harmful_ids = encode_chats(tokenizer, harmful, system_prompt)
        self.harmless_ids = encode_chats(tokenizer, harmless, system_prompt)
        self.batch_size = batch_size or max(len(self.harmful_ids), len(self.harmless_ids), 1)
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.reference: mx.array | ReferenceLogprobs  # first-token log-probs, or the reference for multi-token KL
        if kl_tokens == 1:
            self.reference = shared_first_token_logprobs(model, self.harmless_ids, self.batch_size)
        else:
            self.reference = reference_logprobs(
                model, tokenizer, harmless, kl_tokens=kl_tokens, batch_size=self.batch_size, system_prompt=system_prompt
            )
        self.judge = judge
        self.trials = Trials(model, self.targets, storage_dtype, edited_precision)

    def __call__(self, spec: PlanSpec, dominated: Callable[[float, int], bool] | None = None) -> TrialScore:
        """Score ``spec``; with ``dominated(kl, refusals_so_far)``, stop as soon as it holds (KL comes first)."""

        clock = _Clock()
        plan = kernel_plan(self.directions, spec, self.targets)

        def measure() -> TrialScore:
            clock.lap("apply")
            return self._measure(clock, dominated or (lambda kl, refusals: False))

        result = self.trials.measure(plan, measure)
        clock.lap("restore")
        result.seconds, result.timings = clock.total, clock.laps
        return result

    def _measure(self, clock: _Clock, dominated: Callable[[float, int], bool]) -> TrialScore:
        total = len(self.harmful_ids)
        per_row = self._kl_rows()
        kl, rows = scalar(mx.mean(per_row)), float_list(per_row)  # the mean as kl_divergence takes it
        clock.lap("kl")
        if dominated(kl, 0):
            return TrialScore(0, total, kl, 0.0, 0, pruned=True)
        try:
            refusals, tokens = self._refusals(lambda count: dominated(kl, count))
        except _Dominated as stop:
            return TrialScore(stop.args[0], total, kl, 0.0, 0, pruned=True)
        finally:
            clock.lap("generate")
        return TrialScore(refusals, total, kl, 0.0, tokens, kl_rows=rows)

    def _kl_rows(self) -> mx.array:
        if isinstance(self.reference, ReferenceLogprobs):
            reference, edited = self.reference.logprobs, edited_logprobs(self.model, self.reference, self.batch_size)
        else:
            reference = self.reference
            edited = shared_first_token_logprobs(self.model, self.harmless_ids, self.batch_size)
        return kl_rows(reference, edited)

    def _harmful_answers(self, row_stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy answer tokens for the harmful prompts (a row ends early where ``row_stop`` says so)."""

        return greedy_tokens(
            self.model,
            self.harmful_ids,
            self.max_tokens,
            self.batch_size,
            self.eos,
            None,
            self.progress,
            "harmful",
            prefill_fn=shared_prefill,
            row_stop=row_stop,
        )

    def _refusals(self, dominated_at: Callable[[int], bool]) -> tuple[int, int]:
        refused = 0

        def text(tokens: list[int]) -> str:
            return self.tokenizer.decode(strip_eos(tokens, self.eos))

        if self.judge is not None:
            return self._judged_refusals(self.judge, text)

        def stop(index: int, tokens: list[int]) -> bool:
            nonlocal refused
            answer = split_thinking(text(tokens))[0]
            if answer is None or not contains_refusal_marker(answer, prompt=self.harmful[index]):
                return False
            refused += 1
            if dominated_at(refused):
                raise _Dominated(refused)
            return True

        outputs = self._harmful_answers(row_stop=stop)
        refusals = sum(answer_verdict(text(t), prompt=p) is True for t, p in zip(outputs, self.harmful))
        return refusals, sum(len(t) for t in outputs)

    def _judged_refusals(self, judge: Judge, text: Callable[[list[int]], str]) -> tuple[int, int]:
        """Refusals by the judge: whole answers, then one judging pass (unfinished thinking is not a refusal)."""

        outputs = self._harmful_answers()
        answers = [split_thinking(text(t))[0] for t in outputs]
        pairs = [(p, a) for p, a in zip(self.harmful, answers) if a is not None]
        refusals = sum(v.refusal is True for v in judge.verdicts(pairs))
        return refusals, sum(len(t) for t in outputs)


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


def refusal_judge(config: AbliterationConfig, report: Reporter) -> AbstractContextManager[Judge | None]:
    """What counts a trial's refusals: the calibrated ``--judge`` (loaded for the block, freed after it),
    or None for the refusal markers. The trials and the validation of the best ones both use it."""
    judge = judge_path(config)
    if judge is None:
        return nullcontext()

    def emit(line: str) -> None:
        report.emit("info", line)

    return calibrated_judge(judge, str(config.judge), cache_dir=config.cache_dir, emit=emit)
