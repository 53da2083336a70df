"""SentencePiece GGUF vocabularies (``tokenizer.ggml.model == "llama"``: Gemma, Mistral, Phi-3, Llama 2).

A tiny vocabulary whose scores make the merge order matter (``bc`` outranks ``ab``), with byte
fallback tokens and a user-defined token, is written into a GGUF; the import's ``tokenizer.json``
must split text as llama.cpp itself does (llama-cpp-python, skipped when not installed) and load
in ``transformers`` and ``mlx_lm``.
"""

from __future__ import annotations

import json

import gguf
import pytest

from mlx_abliteration.io.gguf import convert_gguf
from mlx_abliteration.io.gguf_tokenizer import build_tokenizer
from tests.test_gguf import write_gguf

SPACE = "\u2581"
# (token, score): the joined token's score decides which pair merges first, not its position.
NORMAL = [
    (SPACE, -1.0),
    *[(c, -2.0 - i / 100) for i, c in enumerate("abcdehlortw")],
    ("bc", -3.0),
    ("ab", -4.0),
    ("he", -5.0),
    ("ll", -5.5),
    ("llo", -6.0),
    (f"{SPACE}t", -7.0),
    (f"{SPACE}the", -8.0),
    (f"{SPACE}a", -9.0),
    (f"{SPACE}w", -10.0),
    ("or", -11.0),
    (f"{SPACE}wor", -12.0),
    (f"{SPACE}{SPACE}", -13.0),
]
TEXTS = [
    "the abc world",
    "abc",
    "hello  wor, dé z!",
    " the<tool>ab\nc",
    "",
]


def spm_vocab(add_space_prefix: bool = True) -> dict:
    # write_gguf makes id 0 bos and pad, 2 eos
    tokens = ["<s>", "<unk>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "<tool>"]
    types = [3, 2, 3, *[6] * 256, 4]
    scores = [0.0] * len(tokens)
    for token, score in NORMAL:
        tokens.append(token)
        types.append(1)
        scores.append(score)

    def extra(writer):
        writer.add_unk_token_id(1)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(add_space_prefix)

    return {"tokens": tokens, "types": types, "scores": scores, "extra": extra}


def write_spm_gguf(path, add_space_prefix: bool = True):
    vocab = spm_vocab(add_space_prefix)
    write_gguf(path, vocab, "llama", extra=vocab["extra"])
    return vocab


def test_merges_follow_the_joined_tokens_score():
    from mlx_abliteration.io.gguf_spm import spm_merges

    vocab = spm_vocab()
    merges = spm_merges(vocab["tokens"], vocab["scores"], vocab["types"])
    assert merges.index(("b", "c")) < merges.index(("a", "b"))
    assert all("<" not in a + b for a, b in merges)  # no control, byte or user-defined pieces


@pytest.mark.parametrize("prefix", [True, False])
def test_tokenizer_splits_by_score_with_byte_fallback(tmp_path, prefix):
    write_spm_gguf(tmp_path / "m.gguf", prefix)
    tokenizer = build_tokenizer(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "m.gguf")
    pieces = tokenizer.encode("abc dé").tokens
    lead = [f"{SPACE}a"] if prefix else ["a"]
    assert pieces == ["<s>", *lead, "bc", f"{SPACE}", "d", "<0xC3>", "<0xA9>"]
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<tool>", "") or "<tool>" in text


@pytest.mark.parametrize("prefix", [True, False])
def test_import_writes_a_tokenizer_transformers_and_mlx_lm_load(tmp_path, prefix):
    from transformers import AutoTokenizer

    write_spm_gguf(tmp_path / "m.gguf", prefix)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["unk_token"] == "<unk>" and config["add_bos_token"] is True
    hf = AutoTokenizer.from_pretrained(out)
    reference = build_tokenizer(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "m.gguf")
    for text in TEXTS:
        assert hf(text)["input_ids"] == reference.encode(text).ids
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("abc")[0] == 0  # BOS first


def test_unknown_tokenizer_model_names_both_supported(tmp_path):
    from types import SimpleNamespace

    from mlx_abliteration.errors import UserError

    reader = SimpleNamespace(fields={"tokenizer.ggml.model": SimpleNamespace(contents=lambda: "bert")})
    with pytest.raises(UserError, match=r"tokenizer model 'bert'.*gpt2 \(byte-level BPE\), llama \(SentencePiece\)$"):
        build_tokenizer(reader, tmp_path / "m.gguf")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [True, False])
def test_ids_equal_llama_cpp(tmp_path, prefix):
    llama_cpp = pytest.importorskip("llama_cpp")
    write_spm_gguf(tmp_path / "m.gguf", prefix)
    tokenizer = build_tokenizer(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "m.gguf")
    from mlx_abliteration.export.gguf_export import export_gguf

    export_gguf(convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16"), tmp_path / "back.gguf", "f16")
    for name in ("m.gguf", "back.gguf"):  # the file given and the one export-gguf writes
        model = llama_cpp.Llama(str(tmp_path / name), vocab_only=True, verbose=False)
        for text in TEXTS:
            assert tokenizer.encode(text).ids == model.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.mark.parametrize("prefix", [True, False])
def test_export_writes_the_vocabulary_back(tmp_path, prefix, caplog):
    from mlx_abliteration.export.gguf_export import export_gguf

    vocab = write_spm_gguf(tmp_path / "m.gguf", prefix)
    first = convert_gguf(tmp_path / "m.gguf", tmp_path / "first", dtype="float16")
    export_gguf(first, tmp_path / "back.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "back.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.tokens") == vocab["tokens"]
    assert field("tokenizer.ggml.token_type") == vocab["types"]
    assert field("tokenizer.ggml.add_space_prefix") is prefix
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.unknown_token_id")) == (0, 1)
    assert field("tokenizer.ggml.add_bos_token") is True
    assert not [record for record in caplog.records if record.name.startswith("gguf")]  # no pair-template noise
    second = convert_gguf(tmp_path / "back.gguf", tmp_path / "second", dtype="float16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((second / name).read_text()) == json.loads((first / name).read_text()), name


def test_a_metaspace_tokenizer_exports_as_sentencepiece(tmp_path):
    """Mistral's and newer Llama tokenizer files write "▁" with a Metaspace pre-tokenizer instead."""
    from mlx_abliteration.export.gguf_export import export_gguf

    vocab = write_spm_gguf(tmp_path / "m.gguf", False)
    model = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16")
    data = json.loads((model / "tokenizer.json").read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first", "split": False}
    (model / "tokenizer.json").write_text(json.dumps(data))
    export_gguf(model, tmp_path / "back.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "back.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == vocab["tokens"]
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
