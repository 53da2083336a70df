"""SentencePiece GGUF vocabularies (``tokenizer.ggml.model == "llama"``) -> a ``tokenizers.Tokenizer``.

llama.cpp tokenizes these the SentencePiece-BPE way: the text's spaces become "▁" (and one is
prepended when ``tokenizer.ggml.add_space_prefix`` is true, the default), then adjacent pieces
merge greedily, the pair whose joined text is the highest-scoring token first; characters
that are no token fall back to their UTF-8 byte tokens ``<0xNN>``. The equivalent Hugging Face
tokenizer is a BPE model with ``byte_fallback`` whose merges are every split of every normal
token into two normal tokens, ranked by the joined token's score (what transformers'
``SentencePieceExtractor`` builds from a ``tokenizer.model``), behind a normalizer that turns
spaces into "▁" (and prepends one), with no pre-tokenizer: the layout of Gemma's own file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

if TYPE_CHECKING:
    from gguf import GGUFReader

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"  # "▁"


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of normal tokens that joins into a normal token, best joined score first."""
    normal = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_NORMAL}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], index, cut, (left, right)))
    ranked.sort(key=lambda item: item[:3])
    return [pair for *_, pair in ranked]


def build_spm_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that splits text the way llama.cpp's SentencePiece tokenizer does."""
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    scores: list[float] = _meta(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    unk_id = _meta(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and int(unk_id) < len(tokens) else None

    model = models.BPE(
        vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tokenizer = Tokenizer(model)
    # llama.cpp prefixes a space to every stretch of text that starts the input or follows a
    # special token: the normalizer runs once per such stretch (added tokens are cut out first).
    prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    post = _post_processor(reader, tokens)
    if post is not None:
        tokenizer.post_processor = post
    add_listed_tokens(tokenizer, tokens, types)
    return tokenizer


def add_listed_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """The vocabulary's control tokens (special) and user-defined tokens, matched before the model splits."""
    tokenizer.add_tokens(
        [
            AddedToken(token, special=kind == TOKEN_CONTROL, normalized=False)
            for token, kind in zip(tokens, types)
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and token
        ]
    )


def _post_processor(reader: GGUFReader, tokens: list[str]) -> processors.TemplateProcessing | None:
    """BOS before and EOS after the text, as ``add_bos_token`` / ``add_eos_token`` ask."""
    ends = []
    for key, default in (("bos", True), ("eos", False)):
        token_id = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        wanted = bool(_meta(reader, f"tokenizer.ggml.add_{key}_token", default))
        ends.append((tokens[int(token_id)], int(token_id)) if wanted and token_id is not None else None)
    bos, eos = ends
    if bos is None and eos is None:
        return None
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}",
        special_tokens=[end for end in ends if end is not None],
    )
