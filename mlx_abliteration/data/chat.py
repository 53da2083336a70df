"""Prompt -> token ids through the model's own chat template (one place)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_abliteration.errors import UserError

# Config keys that hold how many positions a model can attend over.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_UNKNOWN = 10_000_000  # transformers' model_max_length when the tokenizer does not know it is ~1e30


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Appended when a template leaves the generation prompt inside an open thinking block
# (DeepSeek-R1-style templates end with "<think>\n"): close it empty, as Qwen3 renders enable_thinking=False.
_THINK_CLOSE_SUFFIX = "\n" + THINK_CLOSE + "\n\n"


def template_kwargs(tokenizer: Any) -> dict:
    """Extra chat-template variables: ``enable_thinking=False`` for templates with a reasoning switch
    (Qwen3-style), so the prompt ends after an empty, closed thinking block: where the answer starts.
    Probing, evaluation and the search all encode through here, so they read and answer at that point."""
    template = getattr(tokenizer, "chat_template", None)
    return {"enable_thinking": False} if template and "enable_thinking" in str(template) else {}


def _open_thinking(text: str) -> bool:
    """True if the rendered prompt ends inside a thinking block the template opened."""
    return text.rstrip().endswith(THINK_OPEN)


def render_chat(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The chat-template text with the generation prompt appended (and any thinking block closed)."""
    return _render(tokenizer, chat_messages(prompt, system_prompt))


def _render(tokenizer: Any, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **template_kwargs(tokenizer)
    )
    return text + _THINK_CLOSE_SUFFIX if _open_thinking(text) else text


def encode_messages(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ready for the assistant's next answer.

    A conversation longer than the model's context is refused with a one-line
    error (running it crashed the batched prefill with a segfault). Refusing,
    not truncating: a cut prompt means something else, and cutting it would
    remove the generation prompt where the probe and the answer begin.
    """
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **template_kwargs(tokenizer)
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if THINK_OPEN in str(getattr(tokenizer, "chat_template", None) or "") and _open_thinking(
        _render_raw(tokenizer, messages)
    ):
        ids += list(tokenizer.encode(_THINK_CLOSE_SUFFIX, add_special_tokens=False))
    context = context_length(tokenizer)
    if context is not None and len(ids) >= context:
        text = " ".join(str(messages[-1].get("content", "")).split()) if messages else ""
        preview = text[:40] + ("..." if len(text) > 40 else "")
        raise UserError(
            f"prompt {preview!r} is {len(ids)} tokens with the chat template, but the model's context is {context} "
            "tokens; shorten it or remove it from the dataset"
        )
    return ids


def _render_raw(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **template_kwargs(tokenizer)
    )


def context_length(tokenizer: Any) -> int | None:
    """The model's context in tokens: config.json's max_position_embeddings (or the like), else the
    tokenizer's model_max_length; None when neither is known."""
    path = getattr(tokenizer, "name_or_path", None)
    context = _config_context(str(path)) if path else None
    if context is None:
        limit = getattr(tokenizer, "model_max_length", None)
        context = int(limit) if isinstance(limit, (int, float)) and 0 < limit < _UNKNOWN else None
    return context


@functools.lru_cache(maxsize=32)
def _config_context(path: str) -> int | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(section, dict):
            for key in _CONTEXT_KEYS:
                value = section.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def generation_budget(tokenizer: Any, token_lists: Sequence[Sequence[int]], max_tokens: int) -> int:
    """``max_tokens``, lowered so that the longest prompt plus its answer fits in the context."""
    context = context_length(tokenizer)
    if context is None or not token_lists:
        return max_tokens
    return max(0, min(max_tokens, context - max(len(t) for t in token_lists)))


def encode_chat(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ready for the first answer token."""
    return encode_messages(tokenizer, chat_messages(prompt, system_prompt))


def encode_chats(tokenizer: Any, prompts: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    return [encode_chat(tokenizer, p, system_prompt) for p in prompts]


_SENTINEL = "XQZSENTINELQZX"


# Special-token shapes used by chat templates: <|im_end|>, <|eot_id|>,
# <end_of_turn>, </s>, [/INST].
_SPECIAL = re.compile(r"<\|[^|<>\s]+\|>|<[A-Za-z_][A-Za-z0-9_]*>|</s>|\[/INST\]")


def _render_template(chat_template: str, messages: list[dict]) -> str:
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
        text = _render_template(chat_template, [{"role": "user", "content": _SENTINEL}])
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
