"""Prompts longer than the model's context: a one-line refusal (was a segfault in batched prefill)."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_abliteration.errors import UserError

from .cli_helpers import run_cli

LONG = "tell me a very long story about " + "many words " * 1500  # ~3000+ tokens > 2048


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "harmful.txt").write_text("\n".join([f"harmful prompt {i}" for i in range(6)] + [LONG]))
    (folder / "harmless.txt").write_text("\n".join(f"harmless prompt {i}" for i in range(7)))
    return folder


def _assert_context_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: prompt 'tell me a very long story") and "the model's context is 2048 tokens" in last
    ), last
    assert "shorten it or remove it" in last


def test_probe_refuses_a_prompt_longer_than_the_context(tiny_model, prompts, tmp_path):
    out = tmp_path / "d.safetensors"
    proc = run_cli(
        "probe",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        str(prompts / "harmful.txt"),
        "--harmless-dataset",
        str(prompts / "harmless.txt"),
        "--max-prompts",
        "7",
        "--eval-size",
        "0",
        "--use-layer",
        "1",
        "--output",
        str(out),
    )
    _assert_context_error(proc)
    assert not out.exists()


def test_eval_refuses_a_prompt_longer_than_the_context(tiny_model, prompts, tmp_path):
    proc = run_cli(
        "eval",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        str(prompts / "harmful.txt"),
        "--harmless-dataset",
        str(prompts / "harmless.txt"),
        "--num-prompts",
        "7",
        "--max-tokens",
        "2",
        "--kl-tokens",
        "1",
        "--output",
        str(tmp_path / "r.json"),
    )
    _assert_context_error(proc)
    assert not (tmp_path / "r.json").exists()


def test_generation_never_asks_for_more_tokens_than_fit(tiny_model, tmp_path, monkeypatch):
    from mlx_abliteration.data.chat import context_length, encode_chats
    from mlx_abliteration.evaluation import generation
    from mlx_abliteration.io.model_io import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model(), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (model_dir / "config.json").write_text(json.dumps(config))
    model, tokenizer, _ = load_model(model_dir)
    assert context_length(tokenizer) == 64
    ids = encode_chats(tokenizer, ["hi", "a somewhat longer prompt than the other one"])
    asked = []
    real = generation.greedy_tokens
    monkeypatch.setattr(generation, "greedy_tokens", lambda m, t, n, *a, **k: asked.append(n) or real(m, t, n, *a, **k))
    generation.generate_greedy(model, tokenizer, ids, max_tokens=10_000)
    assert asked == [64 - max(len(i) for i in ids)]
    with pytest.raises(UserError, match="the model's context is 64 tokens"):
        encode_chats(tokenizer, ["word " * 80])


def test_context_falls_back_to_the_tokenizer_limit():
    from mlx_abliteration.data.chat import context_length

    class Tok:
        name_or_path = "/nonexistent/model"
        model_max_length = 512

    assert context_length(Tok()) == 512
    Tok.model_max_length = int(1e30)  # transformers' "unknown"
    assert context_length(Tok()) is None
