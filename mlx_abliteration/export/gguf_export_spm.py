"""A SentencePiece-style ``tokenizer.json`` -> GGUF ``"llama"`` vocabulary, the inverse of ``io.gguf_spm``.

The tokenizer is a BPE model with ``byte_fallback`` behind a normalizer that turns spaces into
"▁" (what the import writes for Gemma, Mistral, Phi-3 and Llama 2 files, and the layout of their
own Hugging Face files). llama.cpp merges by token score, so each token gets the score of the
first merge that forms it (an earlier merge, a higher score): the merges the import derives
again from these scores are the file's, in the same order.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mlx_abliteration.io.gguf_spm import SPACE, TOKEN_BYTE, TOKEN_NORMAL, TOKEN_UNKNOWN

_BYTE = re.compile(r"<0x[0-9A-F]{2}>")


def is_sentencepiece(tokenizer: dict) -> bool:
    """True for a byte-fallback BPE that writes spaces as "▁" (a normalizer's Replace, or Metaspace)."""
    model = tokenizer.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and _replaces_spaces(tokenizer)


def _steps(tokenizer: dict, key: str) -> list[dict]:
    step = tokenizer.get(key) or {}
    return step.get(f"{key}s", []) if step.get("type") == "Sequence" else [step]


def _metaspace(tokenizer: dict) -> dict | None:
    found = [s for s in _steps(tokenizer, "pre_tokenizer") if s.get("type") == "Metaspace"]
    return found[0] if found and found[0].get("replacement") == SPACE else None


def _replaces_spaces(tokenizer: dict) -> bool:
    normalizer = _steps(tokenizer, "normalizer")
    return _metaspace(tokenizer) is not None or any(
        s.get("type") == "Replace" and s.get("content") == SPACE for s in normalizer
    )


def _adds_space_prefix(tokenizer: dict) -> bool:
    metaspace = _metaspace(tokenizer)
    if metaspace is not None and metaspace.get("prepend_scheme", "always") != "never":
        return True
    return any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in _steps(tokenizer, "normalizer"))


def special_vocab(model_dir: Path, load_merges: bool, n_vocab: int) -> Any:
    """``gguf.SpecialVocab``, without its warning about a BOS before the second text of a pair
    (the Llama/Gemma template ``<bos> A <bos> B``, which llama.cpp has no key for)."""
    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)


def _scores(tokenizer: dict, tokens: list[str]) -> list[float]:
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in tokenizer["model"].get("merges", [])]
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    # tokens no merge forms rank after every merge (llama.cpp never reads their score)
    return [-float(first.get(token, len(merges) + i)) for i, token in enumerate(tokens)]


def add_spm_vocab(writer: Any, model_dir: Path, tokenizer: dict, tokens: list[str], types: list[int]) -> None:
    """Write tokens, scores, types, ``add_space_prefix`` and the special ids (``SpecialVocab``'s, plus unk).

    ``tokens`` and ``types`` are ``gguf_export_vocab.token_table``'s, one per embedding row.
    """
    types = list(types)
    unk = tokenizer["model"].get("unk_token")
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_NORMAL and _BYTE.fullmatch(token):
            types[i] = TOKEN_BYTE
        elif kind == TOKEN_NORMAL and token == unk:
            types[i] = TOKEN_UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(_scores(tokenizer, tokens))
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    special = special_vocab(model_dir, False, len(tokens))
    if unk in tokens:  # SpecialVocab finds only an unk token that is an added token
        special.special_token_ids.setdefault("unk", tokens.index(unk))
    special.add_to_gguf(writer, quiet=True)
