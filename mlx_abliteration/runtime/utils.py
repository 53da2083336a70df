"""Small shared helpers: layer index by parameter name, chat-template markers, file digests, the cache dir."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NoReturn

from jinja2.sandbox import ImmutableSandboxedEnvironment

_SENTINEL = "XQZSENTINELQZX"
# Special-token shapes used by chat templates: <|im_end|>, <|eot_id|>,
# <end_of_turn>, </s>, [/INST].
_SPECIAL = re.compile(r"<\|[^|<>\s]+\|>|<[A-Za-z_][A-Za-z0-9_]*>|</s>|\[/INST\]")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder-layer index of a parameter name (``model.layers.7.mlp...`` -> 7)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``--cache-dir``, else ``$MLX_ABLITERATION_CACHE`` or ``~/.cache/mlx-abliteration``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MLX_ABLITERATION_CACHE") or Path.home() / ".cache" / "mlx-abliteration").expanduser()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA256 of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _render(chat_template: str, messages: list[dict]) -> str:
    def raise_exception(message: str) -> NoReturn:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token="", tools=None
    )


def extract_eot_from_chat_template(chat_template: str | None) -> str | None:
    """The end-of-turn marker that closes a user message in ``chat_template``.

    Renders a sentinel user turn and returns the first special token after
    it (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3,
    ``<end_of_turn>`` for Gemma, ``[/INST]`` for Mistral). None if not found.
    """
    if not chat_template:
        return None
    try:
        text = _render(chat_template, [{"role": "user", "content": _SENTINEL}])
    except Exception:
        text = None
    if text and _SENTINEL in text:
        match = _SPECIAL.search(text, text.rindex(_SENTINEL) + len(_SENTINEL))
        if match:
            return match.group(0)
    for known in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "[/INST]", "</s>"):
        if known in chat_template:
            return known
    return None
