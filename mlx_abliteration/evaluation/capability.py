"""Capability kept, beyond KL: short questions with exact answers, asked before and after the edit.

The set is generated, deterministic and packaged (no file, no download):
arithmetic with small numbers from a fixed seed, interleaved with a fixed list
of facts (capitals, chemical symbols, ...). An answer is correct if the
expected answer occurs in it as a whole word (a number: as a whole number).
The report's figure is the share of the questions the *original* answered
correctly that the edited model still answers correctly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlx_abliteration.config.defaults import CAPABILITY_MAX_TOKENS
from mlx_abliteration.data.chat import encode_chats, generation_budget
from mlx_abliteration.evaluation.generation import greedy_tokens, strip_eos
from mlx_abliteration.evaluation.refusals import split_thinking

if TYPE_CHECKING:
    import mlx.nn as nn

    from mlx_abliteration.probe.batching import Progress

_FACTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical formula of water?", "H2O"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("Which language is mainly spoken in Brazil?", "Portuguese"),
)
_SUFFIX = " Answer with just the answer, no explanation."


def capability_questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (question, expected answer) pairs: arithmetic and facts alternating, the same for the same ``n``."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    facts = iter(_FACTS)
    while len(out) < n:
        fact = next(facts, None) if len(out) % 2 else None
        if fact is not None:
            out.append((fact[0] + _SUFFIX, fact[1]))
            continue
        a, b = rng.randint(11, 99), rng.randint(2, 49)
        op = rng.choice("+-*")
        if op == "*":
            b = rng.randint(2, 12)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((f"What is {a} {'×' if op == '*' else op} {b}?{_SUFFIX}", str(value)))
    return out


def is_correct(answer: str, expected: str) -> bool:
    """``expected`` occurs in ``answer`` as a whole word (case-insensitive; numbers not inside longer numbers)."""
    if expected.lstrip("-").isdigit():
        return re.search(rf"(?<![\d.,]){re.escape(expected)}(?![\d]|[.,]\d)", answer) is not None
    return re.search(rf"\b{re.escape(expected)}\b", answer, flags=re.IGNORECASE) is not None


def capability_rows(
    model: nn.Module,
    tokenizer: Any,
    n: int,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    progress: Progress | None = None,
    max_tokens: int = CAPABILITY_MAX_TOKENS,
) -> list[dict]:
    """Greedy answers to the first ``n`` questions: rows with ``kind`` "capability", ``expected`` and ``correct``."""

    questions = capability_questions(n)
    token_lists = encode_chats(tokenizer, [q for q, _ in questions], system_prompt)
    eos = frozenset(tokenizer.eos_token_ids)
    budget = generation_budget(tokenizer, token_lists, max_tokens)
    outputs = greedy_tokens(model, token_lists, budget, batch_size, eos, None, progress, "capability")
    rows = []
    for (question, expected), tokens in zip(questions, outputs):
        text = tokenizer.decode(strip_eos(tokens, eos))
        answer = split_thinking(text)[0]
        rows.append(
            {
                "kind": "capability",
                "prompt": question,
                "response": text,
                "expected": expected,
                "correct": answer is not None and is_correct(answer, expected),
            }
        )
    return rows


def kept_share(before: Sequence[bool] | None, after: Sequence[bool] | None) -> tuple[int, int] | None:
    """(still correct, correct before) over the questions the original answered correctly."""
    if not before or not after or len(before) != len(after):
        return None
    base = [i for i, ok in enumerate(before) if ok]
    return sum(bool(after[i]) for i in base), len(base)
