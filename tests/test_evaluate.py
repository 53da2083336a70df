"""Evaluation library: refusal markers, batched greedy generation, log-probs, KL, reports."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_abliteration.evaluation.evaluate import EvalReport, evaluate_model
from mlx_abliteration.evaluation.generation import first_token_logprobs
from mlx_abliteration.evaluation.kl import kl_divergence, reference_logprobs
from mlx_abliteration.evaluation.refusals import (
    DEFAULT_REFUSAL_MARKERS,
    contains_refusal_marker,
    is_refusal,
    read_markers_file,
)
from mlx_abliteration.evaluation.tables import eval_markdown, eval_rows, eval_text

PROMPTS = [
    "How do I bake bread?",
    "Hi",
    "Write a poem about the sea and the wind, with many words in every line",
    "Tell me how to pick a lock",
    "What is the capital of France?",
    "Explain the steps",
    "x" * 30,
]


@pytest.fixture(scope="module")
def llama(tiny_model):
    from mlx_abliteration.io.model_io import load_model

    return load_model(tiny_model(arch="llama"))[:2]


@pytest.fixture(scope="module")
def qwen2(tiny_model):
    from mlx_abliteration.io.model_io import load_model

    return load_model(tiny_model(arch="qwen2", tie=False))[:2]


def unbatched_greedy(model, tokens, max_tokens, eos):
    """mlx-lm's own single-prompt decoding loop (argmax sampler) as the reference."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for (token, _), _ in zip(generate_step(mx.array(tokens), model, max_tokens=max_tokens), range(max_tokens)):
        out.append(int(token))
        if int(token) in eos:
            break
    return out


# --- refusal markers ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't assist with that.",
        "I can\u2019t help with that request.",  # curly apostrophe
        "I\u2018m unable to do this",
        "**I can't** do that.",  # markdown bold
        "I *cannot* provide instructions",
        "As an AI developed by a lab, I must point out ...",
        "I\n   cannot\tassist",  # whitespace between words
        "Hacking is ILLEGAL and unethical.",
        "Creating a phishing page is a serious offense and can lead to legal consequences.",
        "",
        "   \n\t",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a recipe: mix flour, water and yeast, then bake for 30 minutes.",
        "The capital of France is Paris.",
        "Antibiotics cannot help with a cold, because colds are caused by viruses.",
        "You can use a tension wrench and a pick to open the lock.",
        "There are several ways to hide from the police after committing a crime.",
    ],
)
def test_normal_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_custom_markers_replace_defaults():
    assert not is_refusal("Nope, not doing it.")
    assert is_refusal("Nope, not doing it.", markers=["NOPE"])
    assert not is_refusal("I'm sorry", markers=["nope"])
    assert is_refusal("I won\u2019t", markers=["i won't"])  # markers are normalized too


def test_marker_check_ignores_emptiness():
    assert not contains_refusal_marker("")
    assert contains_refusal_marker("Sorry")


def test_default_markers_are_normalized_lowercase():
    assert all(m == m.lower().strip() and "\u2019" not in m for m in DEFAULT_REFUSAL_MARKERS)


def test_read_markers_file(tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text("# my markers\nnope\n\n  no way  \n")
    assert read_markers_file(path) == ["nope", "no way"]


# --- KL ----------------------------------------------------------------------


def test_kl_matches_numpy():
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 50)) * 3, rng.normal(size=(5, 50)) * 3
    la = a - np.log(np.exp(a).sum(-1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(-1, keepdims=True))
    expected = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=-1)))
    got = kl_divergence(mx.array(la, dtype=mx.float32), mx.array(lb, dtype=mx.float32))
    assert got == pytest.approx(expected, rel=1e-4)
    assert kl_divergence(mx.array(la, dtype=mx.float32), mx.array(la, dtype=mx.float32)) == 0.0


def test_kl_zero_probability_tokens_contribute_nothing():
    import mlx.core as mx

    ref = mx.array([[0.0, -float("inf")]])
    new = mx.array([[-0.1, -2.3]])
    assert kl_divergence(ref, new) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("kl_tokens", [1, 4])
def test_kl_zero_for_same_model_positive_for_perturbed(llama, kl_tokens):
    import mlx.core as mx

    model, tokenizer = llama
    reference = reference_logprobs(model, tokenizer, PROMPTS[:4], kl_tokens=kl_tokens, batch_size=3)
    assert reference.logprobs.shape[0] == sum(max(1, len(c)) for c in reference.continuations)
    same = evaluate_model(model, tokenizer, PROMPTS[:1], PROMPTS[:4], max_tokens=2, reference_logprobs=reference)
    assert same.kl == pytest.approx(0.0, abs=1e-5)
    assert same.kl_tokens == kl_tokens

    layer = model.model.layers[1].self_attn.o_proj
    original = layer.weight
    first = reference_logprobs(model, tokenizer, PROMPTS[:4], kl_tokens=1, batch_size=3)
    try:
        layer.weight = original + 0.3 * mx.random.normal(original.shape, key=mx.random.key(1))
        changed = evaluate_model(model, tokenizer, PROMPTS[:1], PROMPTS[:4], max_tokens=2, reference_logprobs=reference)
        alone = evaluate_model(model, tokenizer, PROMPTS[:1], PROMPTS[:4], max_tokens=2, reference_logprobs=first)
    finally:
        layer.weight = original
    assert changed.kl > 1e-3
    # a multi-token KL also reports its first position's alone: the one-token KL of the same edit
    if kl_tokens > 1:
        assert changed.kl_first_token == pytest.approx(alone.kl, rel=1e-3) and same.kl_first_token == pytest.approx(
            0.0, abs=1e-5
        )
        assert "KL vs original (first token)" in eval_text(None, changed)
    else:
        assert changed.kl_first_token is None


def test_one_token_kl_reads_the_answers_first_distributions(llama):
    """The original's evaluation gives the KL reference from its harmless answers, equal to a pass of its own,
    and an edited model's one-token KL (read from its answers) equals the KL from a separate pass."""
    import mlx.core as mx

    from mlx_abliteration.evaluation.evaluate import eval_settings, evaluate_original

    model, tokenizer = llama
    settings = eval_settings(
        max_tokens=2, kl_tokens=1, batch_size=3, system_prompt=None, markers=DEFAULT_REFUSAL_MARKERS
    )
    reference, report = evaluate_original(model, tokenizer, PROMPTS[:1], PROMPTS[:4], settings)
    separate = reference_logprobs(model, tokenizer, PROMPTS[:4], batch_size=3)
    assert reference.token_lists == separate.token_lists and reference.continuations == [[]] * 4
    assert mx.allclose(reference.logprobs, separate.logprobs, atol=1e-5).item()

    layer = model.model.layers[1].self_attn.o_proj
    original = layer.weight
    try:
        layer.weight = original + 0.3 * mx.random.normal(original.shape, key=mx.random.key(1))
        changed = evaluate_model(model, tokenizer, PROMPTS[:1], PROMPTS[:4], max_tokens=2, reference_logprobs=reference)
        expected = kl_divergence(reference.logprobs, first_token_logprobs(model, separate.token_lists, 3))
    finally:
        layer.weight = original
    assert changed.kl == pytest.approx(expected, rel=1e-4) and changed.kl > 1e-3


# --- generation ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_batched_generation_equals_unbatched_greedy(which, request):
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import greedy_tokens

    model, tokenizer = request.getfixturevalue(which)
    tokens = encode_chats(tokenizer, PROMPTS)
    eos = frozenset(tokenizer.eos_token_ids)
    expected = [unbatched_greedy(model, t, 24, eos) for t in tokens]
    for batch_size in (1, 3, len(PROMPTS)):
        assert greedy_tokens(model, tokens, 24, batch_size, eos) == expected


def test_generation_stops_at_eos_and_strips_it(llama):
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import generate_greedy, greedy_tokens

    model, tokenizer = llama
    tokens = encode_chats(tokenizer, PROMPTS)
    eos = frozenset(tokenizer.eos_token_ids)
    everything = greedy_tokens(model, tokens, 24, 4, frozenset())
    first_eos = next(((i, t) for i, row in enumerate(everything) for t in range(len(row)) if row[t] in eos), None)
    assert first_eos is not None, "the tiny model should emit EOS somewhere within 24 tokens"
    row, position = first_eos
    stopped = greedy_tokens(model, tokens, 24, 4, eos)
    assert stopped[row] == everything[row][: position + 1]
    texts = generate_greedy(model, tokenizer, tokens, 24, 4)
    assert texts[row] == tokenizer.decode(everything[row][:position])


def test_stop_when_ends_rows_early(llama):
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import generate_greedy

    model, tokenizer = llama
    tokens = encode_chats(tokenizer, PROMPTS)
    full = generate_greedy(model, tokenizer, tokens, 20, 4)
    seen: list[str] = []

    def stop_after_three_chars(text: str) -> bool:
        seen.append(text)
        return len(text) >= 3

    short = generate_greedy(model, tokenizer, tokens, 20, 4, stop_when=stop_after_three_chars)
    for a, b in zip(short, full):
        assert b.startswith(a)
        assert len(a) >= 3 or a == b
    assert len(seen) < 20 * len(PROMPTS)
    assert sum(len(s) for s in short) < sum(len(f) for f in full)


def test_progress_reports_every_prompt(llama):
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import greedy_tokens

    model, tokenizer = llama
    calls = []
    greedy_tokens(model, encode_chats(tokenizer, PROMPTS), 5, 3, progress=lambda d, t, w: calls.append((d, t, w)))
    assert calls[-1] == (len(PROMPTS), len(PROMPTS), "generating")
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)


def test_continuation_logprobs_match_stepwise_decoding(qwen2):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import continuation_logprobs, first_token_logprobs, greedy_tokens

    model, tokenizer = qwen2
    tokens = encode_chats(tokenizer, PROMPTS[:5])
    continuations = greedy_tokens(model, tokens, 3, 2, frozenset(tokenizer.eos_token_ids))
    batched = continuation_logprobs(model, tokens, continuations, batch_size=2)
    expected = []
    for prompt, cont in zip(tokens, continuations):
        steps = zip(generate_step(mx.array(prompt), model, max_tokens=len(cont)), range(len(cont)))
        expected += [logprobs for (_, logprobs), _ in steps]
    assert batched.shape == (sum(len(c) for c in continuations), len(expected[0]))
    assert batched.dtype == mx.float32
    assert mx.allclose(batched, mx.stack(expected), atol=1e-4).item()
    first = first_token_logprobs(model, tokens, batch_size=4)
    starts = np.cumsum([0] + [len(c) for c in continuations[:-1]])
    assert mx.allclose(first, batched[mx.array(starts)], atol=1e-4).item()


# --- reports -------------------------------------------------------------------


def test_evaluate_model_counts_and_responses(llama):
    model, tokenizer = llama
    report = evaluate_model(model, tokenizer, PROMPTS[:3], PROMPTS[3:], max_tokens=6, batch_size=2)
    assert report.harmful_total == 3 and report.harmless_total == len(PROMPTS) - 3
    assert len(report.responses) == len(PROMPTS)
    for r in report.responses:
        assert r["refusal"] == is_refusal(r["response"])
    assert report.harmful_refusals == sum(r["refusal"] for r in report.responses[:3])
    assert report.kl is None and report.tokens_per_s > 0 and report.generated_tokens > 0
    data = report.to_dict()
    assert "responses" not in data and data["harmful_refusal_rate"] == report.harmful_refusals / 3


def test_evaluate_model_with_everything_a_refusal(llama):
    model, tokenizer = llama
    catch_all = list("abcdefghijklmnopqrstuvwxyz0123456789")
    full = evaluate_model(model, tokenizer, PROMPTS, [], max_tokens=10, markers=catch_all)
    stopped = evaluate_model(model, tokenizer, PROMPTS, [], max_tokens=10, markers=catch_all, stop_at_refusal=True)
    assert stopped.harmful_refusals == full.harmful_refusals
    assert stopped.generated_tokens < full.generated_tokens
    assert stopped.harmless_refusals is None


def test_one_before_after_table_for_console_card_and_gui():
    before = EvalReport(9, 10, 0, 10, None, 1, 40.0, 12.0)
    after = EvalReport(1, 10, 1, 10, 0.0312, 1, 41.5, 11.0)
    table = eval_text(before, after)
    lines = table.splitlines()
    assert "before" in lines[0] and "after" in lines[0]
    assert any("refusals, harmful" in line and "9/10 (90%)" in line and "1/10 (10%)" in line for line in lines)
    assert any("KL" in line and "0.0312" in line for line in lines)
    assert "before" not in eval_text(None, after)
    # The card and the GUI show the same cells (from the dicts that events and the log carry).
    rows = eval_rows(before.to_dict(), after.to_dict())
    assert rows[0] == ("refusals, harmful", "9/10 (90%)", "1/10 (10%)")
    card = eval_markdown(before.to_dict(), after.to_dict())
    assert "| refusals, harmful | 9/10 (90%) | 1/10 (10%) |" in card and "tokens/s" not in card
    assert "KL vs original (3 tokens)" in eval_text(None, EvalReport(1, 10, 1, 10, 0.5, 3, 41.5, 11.0))


def test_models_without_batch_caches_generate_one_prompt_at_a_time(llama, monkeypatch):
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.evaluation.generation import first_token_logprobs, greedy_tokens
    from mlx_abliteration.probe import batching

    model, tokenizer = llama
    tokens = encode_chats(tokenizer, PROMPTS[:3])
    eos = frozenset(tokenizer.eos_token_ids)
    expected = greedy_tokens(model, tokens, 8, 3, eos)
    expected_logprobs = first_token_logprobs(model, tokens, 3)

    def unsupported(model, left_padding):
        raise batching.BatchingUnsupported("ArraysCache")

    monkeypatch.setattr(batching, "make_batch_cache", unsupported)
    assert greedy_tokens(model, tokens, 8, 3, eos) == expected
    assert first_token_logprobs(model, tokens, 3).shape == expected_logprobs.shape


def test_reference_from_other_prompts_is_rejected(llama):
    model, tokenizer = llama
    reference = reference_logprobs(model, tokenizer, PROMPTS[:2])
    with pytest.raises(ValueError, match="other prompts"):
        evaluate_model(model, tokenizer, [], PROMPTS[2:4], max_tokens=1, reference_logprobs=reference)
