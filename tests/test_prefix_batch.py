"""Shared-prefix prefill: the same next-token distributions and greedy answers as the plain batched prefill."""

import mlx.core as mx
import pytest

import mlx_abliteration.probe.prefix_batch as prefix_batch
from mlx_abliteration.data.chat import encode_chats
from mlx_abliteration.evaluation.generation import first_token_logprobs, greedy_tokens
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.batching import log_softmax, prefill
from mlx_abliteration.probe.prefix_batch import prefill_prefix_length, shared_first_token_logprobs, shared_prefill


def first_token_logprobs_plain(model, ids):
    """The reference: every prompt whole, left-padded in one batch (``batching.prefill``)."""
    logits, _ = prefill(model, ids)
    return log_softmax(logits[:, -1, :].astype(mx.float32))


PROMPTS = [f"How do I bake bread recipe number {i}" + " please" * (i % 5) for i in range(9)]


def test_shared_prefix_leaves_a_token_per_prompt():
    assert prefill_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == 3
    assert prefill_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert prefill_prefix_length([[1, 2], [2, 2]]) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_logprobs_and_greedy_answers_as_plain_prefill(tiny_model, arch, monkeypatch):
    model, tokenizer, _ = load_model(tiny_model(arch=arch))
    ids = encode_chats(tokenizer, PROMPTS, None)
    assert prefill_prefix_length(ids) > 10
    monkeypatch.setattr(prefix_batch, "PADDING_ALLOWANCE", 2)  # several length groups
    assert len(list(prefix_batch.length_groups([len(t) for t in ids], 2))) > 1
    assert mx.allclose(shared_first_token_logprobs(model, ids), first_token_logprobs_plain(model, ids), atol=1e-4)
    assert mx.allclose(first_token_logprobs(model, ids, 4), first_token_logprobs_plain(model, ids), atol=1e-4)
    eos = frozenset(tokenizer.eos_token_ids)
    plain = greedy_tokens(model, ids, 10, 16, eos, prefill_fn=prefill)
    assert greedy_tokens(model, ids, 10, 16, eos) == plain  # the default is the shared prefill
    assert greedy_tokens(model, ids, 10, 16, eos, prefill_fn=shared_prefill) == plain


def test_length_groups_cut_where_padding_exceeds_the_allowance():
    lengths = [5, 1, 5, 9, 5]
    assert list(prefix_batch.length_groups(lengths, 100)) == [[1, 0, 2, 4, 3]]
    assert list(prefix_batch.length_groups(lengths, 4)) == [[1, 0, 2, 4], [3]]  # 1 + 5 + 5 + 5 pads 4
    assert list(prefix_batch.length_groups(lengths, 3)) == [[1], [0, 2, 4], [3]]


def test_same_logprobs_with_one_token_suffixes(tiny_model):
    model, _, _ = load_model(tiny_model())
    ids = [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8, 10, 11]]  # two suffixes of one token: no body for them
    assert mx.allclose(shared_first_token_logprobs(model, ids), first_token_logprobs_plain(model, ids), atol=1e-5)
    assert mx.allclose(
        shared_first_token_logprobs(model, ids[:2]), first_token_logprobs_plain(model, ids[:2]), atol=1e-5
    )


def test_prompts_without_a_common_prefix_use_the_plain_prefill(tiny_model):
    model, _, _ = load_model(tiny_model())
    ids = [[5, 6, 7], [8, 9]]
    logits, cache = shared_prefill(model, ids)
    assert logits.shape[:2] == (2, 1) and cache is not None
    assert mx.allclose(shared_first_token_logprobs(model, ids), first_token_logprobs_plain(model, ids), atol=1e-5)


def test_models_without_batched_caches_get_one_prompt_at_a_time(tiny_model, monkeypatch):
    from mlx_abliteration.probe import batching

    model, tokenizer, _ = load_model(tiny_model())
    ids = encode_chats(tokenizer, PROMPTS[:4], None)
    expected = first_token_logprobs_plain(model, ids)

    def unsupported(model, left_padding):
        raise batching.BatchingUnsupported("ArraysCache")

    monkeypatch.setattr(batching, "make_batch_cache", unsupported)
    monkeypatch.setattr(prefix_batch, "prefix_kv_cache", lambda *args, **kwargs: None)  # not plain KV caches
    assert mx.allclose(shared_first_token_logprobs(model, ids), expected, atol=1e-5)


def test_batch_caches_grow_in_small_steps(tiny_model):
    """An evaluation batch's KV cache holds about what was written, not mlx-lm's 256-token blocks."""
    from mlx_abliteration.probe.batching import KV_CACHE_STEP

    model, tokenizer, _ = load_model(tiny_model())
    ids = encode_chats(tokenizer, PROMPTS, None)
    for fill in (shared_prefill, prefill):
        _, caches = fill(model, ids)
        written = caches[0].size()
        assert caches[0].keys.shape[2] - written <= 64 and caches[0].step == KV_CACHE_STEP == 64
