"""GGUF tokenizer metadata -> ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and SentencePiece (``"llama"``, built in
``gguf_spm``) vocabularies are read. The byte-level pre-tokenizer follows ``tokenizer.ggml.pre``
the way llama.cpp does: the same split regexes, written in the form Hugging Face ``tokenizers``
uses for those model families.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_spm import TOKEN_CONTROL, TOKEN_NORMAL, add_listed_tokens, build_spm_tokenizer

if TYPE_CHECKING:
    from gguf import GGUFReader
    from tokenizers import Tokenizer
    from tokenizers.processors import PostProcessor


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text of end-of-generation control tokens that llama.cpp also stops on.
_END_OF_GENERATION = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>"}


@dataclass(frozen=True)
class PreTokenizerStyle:
    split_regex: str | None  # None: GPT-2's regex inside the ByteLevel pre-tokenizer
    individual_digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False


_GPT2 = PreTokenizerStyle(None)
_STARCODER = PreTokenizerStyle(None, individual_digits=True)
_LLAMA3 = PreTokenizerStyle(LLAMA3_REGEX, ignore_merges=True)
_QWEN2 = PreTokenizerStyle(QWEN2_REGEX, nfc=True)

PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def pre_tokenizer_style(reader: GGUFReader, path: Path) -> PreTokenizerStyle | None:
    """The byte-level BPE pre-tokenizer; None for a SentencePiece vocabulary (it has none)."""
    model = _meta(reader, "tokenizer.ggml.model")
    if model == "llama":
        return None
    if model != "gpt2":
        raise UserError(
            f"tokenizer model {model!r} in {Path(path).name} is not supported; "
            "supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"unsupported pre-tokenizer {pre!r} in {Path(path).name}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return PRE_TOKENIZERS[pre]


def build_tokenizer(reader: GGUFReader, path: Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary."""

    style = pre_tokenizer_style(reader, path)
    if style is None:
        return build_spm_tokenizer(reader)
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=style.ignore_merges))
    if style.nfc:
        tokenizer.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style.split_regex is None)
    steps: list[pre_tokenizers.PreTokenizer] = []
    if style.split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(style.split_regex), behavior="isolated", invert=False))
    if style.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(reader, tokens)

    add_listed_tokens(tokenizer, tokens, types)
    return tokenizer


def _post_processor(reader: GGUFReader, tokens: list[str]) -> PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = _meta(reader, "tokenizer.ggml.bos_token_id")
    if not _meta(reader, "tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return byte_level
    bos = tokens[int(bos_id)]
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
    )
    return processors.Sequence([byte_level, template])


def eos_token_ids(reader: GGUFReader) -> list[int]:
    """EOS, EOT and EOM ids, plus control tokens llama.cpp treats as end of generation."""
    ids = [_meta(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    tokens = _meta(reader, "tokenizer.ggml.tokens", [])
    types = _meta(reader, "tokenizer.ggml.token_type", [])
    ids += [
        i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_CONTROL and token in _END_OF_GENERATION
    ]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _token_text(reader: GGUFReader, key: str) -> str | None:
    token_id = _meta(reader, f"tokenizer.ggml.{key}_token_id")
    tokens = _meta(reader, "tokenizer.ggml.tokens", [])
    return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None


def write_tokenizer_files(reader: GGUFReader, out_dir: Path, path: Path, max_length: int, eos_ids: list[int]) -> None:
    """Write the three tokenizer-side files ``mlx_lm.load`` and ``transformers`` read."""
    build_tokenizer(reader, path).save(str(out_dir / "tokenizer.json"))
    sentencepiece = _meta(reader, "tokenizer.ggml.model") == "llama"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_text(reader, "bos"),
        "eos_token": _token_text(reader, "eos"),
        "pad_token": _token_text(reader, "padding"),
        "unk_token": _token_text(reader, "unknown"),
        # llama.cpp adds BOS to SentencePiece vocabularies unless told not to
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if (template := _meta(reader, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    generation: dict[str, int | list[int]] = {}
    for key, value in (
        ("bos_token_id", _meta(reader, "tokenizer.ggml.bos_token_id")),
        ("pad_token_id", _meta(reader, "tokenizer.ggml.padding_token_id")),
    ):
        if value is not None:
            generation[key] = int(value)
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
