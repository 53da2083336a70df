"""An MLX model dir's tokenizer -> GGUF tokenizer metadata, the inverse of ``gguf_tokenizer``.

Byte-level BPE tokenizers (``tokenizer.ggml.model == "gpt2"``) whose pre-tokenizer is one of
the styles the import knows are written here (SentencePiece-style ones in ``gguf_export_spm``);
``tokenizer.ggml.pre`` names that style the way llama.cpp does. Special token ids, ``add_bos``/``add_eos``, merges and the chat template
come from the ``gguf`` package's own ``SpecialVocab`` (what llama.cpp's converter uses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.export.gguf_export_spm import add_spm_vocab, is_sentencepiece, special_vocab
from mlx_abliteration.io.gguf_spm import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED
from mlx_abliteration.io.gguf_tokenizer import PRE_TOKENIZERS, PreTokenizerStyle

TOKEN_UNUSED = 5  # llama.cpp's type for the "[PAD<id>]" fillers of ids the tokenizer lacks
# The name written for each style; "smollm" is llama.cpp's "starcoder" without the clean-up of
# spaces when detokenizing, so a tokenizer that cleans them up is written as "starcoder".
_NAMES = ("gpt-2", "smollm", "starcoder", "llama-bpe", "qwen2")


def _read_tokenizer(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{model_dir} has no tokenizer.json; GGUF export needs the fast (byte-level BPE) tokenizer file"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}); restore the model's tokenizer.json") from None
    model = data.get("model") if isinstance(data, dict) else None
    decoder = data.get("decoder") or {}
    if isinstance(model, dict) and is_sentencepiece(data):
        return data
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            f"{path} is neither a byte-level BPE nor a SentencePiece-style tokenizer; GGUF export supports only those"
        )
    if decoder.get("type") != "ByteLevel":
        raise UserError(f"{path} has no ByteLevel decoder; GGUF export supports only byte-level BPE tokenizers")
    return data


def _style(tokenizer: dict) -> PreTokenizerStyle | None:
    """The import's pre-tokenizer style that ``tokenizer`` equals, judged by its structure; None if none."""
    normalizer = tokenizer.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        return None
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    regex, digits = None, False
    for step in steps[:-1]:
        if step.get("type") == "Split" and regex is None and step.get("behavior") == "Isolated":
            if step.get("invert") or "Regex" not in (step.get("pattern") or {}):
                return None
            regex = step["pattern"]["Regex"]
        elif step == {"type": "Digits", "individual_digits": True} and not digits:
            digits = True
        else:
            return None
    if (regex is None) != bool(steps[-1].get("use_regex", True)):  # exactly one regex split, not two or none
        return None
    ignore_merges = bool(tokenizer["model"].get("ignore_merges", False))
    return PreTokenizerStyle(regex, individual_digits=digits, nfc=normalizer is not None, ignore_merges=ignore_merges)


def pre_tokenizer_name(tokenizer: dict, clean_up_spaces: bool, path: Path) -> str:
    """``tokenizer.ggml.pre`` for a ``tokenizer.json``; a tokenizer of no known style is a ``UserError``."""
    style = _style(tokenizer)
    names = [name for name in _NAMES if PRE_TOKENIZERS[name] == style]
    if not names:
        raise UserError(
            f"the pre-tokenizer in {path} matches none that llama.cpp knows here "
            f"({', '.join(_NAMES)}); GGUF export cannot name it"
        )
    return names[-1] if clean_up_spaces and len(names) > 1 else names[0]


def token_table(tokenizer: dict, n_vocab: int, path: Path) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types for ids 0..n_vocab-1 (the embedding's rows)."""
    by_id: dict[int, str] = {int(i): text for text, i in tokenizer["model"].get("vocab", {}).items()}
    added: dict[int, dict[str, Any]] = {int(t["id"]): t for t in tokenizer.get("added_tokens") or []}
    by_id.update({i: str(t["content"]) for i, t in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise UserError(
            f"{path} has token id {max(by_id)} but the embedding has only {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None or (i not in added and text == f"[PAD{i}]"):
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(text)
            kind = TOKEN_NORMAL
            if i in added:
                kind = TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED
            types.append(kind)
    return tokens, types


def add_vocab(writer: Any, model_dir: Path, n_vocab: int) -> None:
    """Write the tokenizer keys (model, pre, tokens, types, merges, special ids, chat template)."""

    tokenizer = _read_tokenizer(model_dir)
    try:
        tok_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tok_config = {}
    clean_up = bool(tok_config.get("clean_up_tokenization_spaces", False)) if isinstance(tok_config, dict) else False
    path = model_dir / "tokenizer.json"
    if is_sentencepiece(tokenizer):
        add_spm_vocab(writer, model_dir, tokenizer, *token_table(tokenizer, n_vocab, path))
        return
    name = pre_tokenizer_name(tokenizer, clean_up, path)
    tokens, types = token_table(tokenizer, n_vocab, path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = special_vocab(model_dir, True, n_vocab)
    if not special.merges:
        raise UserError(f"{path} has no BPE merges; the tokenizer is incomplete")
    special.add_to_gguf(writer, quiet=True)
