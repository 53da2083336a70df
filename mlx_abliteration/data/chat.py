"""Prompt -> token ids through the model's own chat template (one place)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
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
    text = _render_raw(tokenizer, messages)
    return text + _THINK_CLOSE_SUFFIX if _open_thinking(text) else text


def model_name(tokenizer: Any) -> str:
    """The model a tokenizer was loaded from, for messages."""
    return str(getattr(tokenizer, "name_or_path", "") or "the model")


def has_chat_template(tokenizer: Any) -> bool:
    """mlx-lm's ``has_chat_template`` (a template, or a renderer of its own), else a ``chat_template`` set."""
    known = getattr(tokenizer, "has_chat_template", None)
    return bool(known) if isinstance(known, bool) else bool(getattr(tokenizer, "chat_template", None))


def _no_template(name: str) -> UserError:
    return UserError(
        f"{name} has no chat template (a base model?): every prompt is read as a chat turn; use the model's "
        "instruct/chat version, or add a chat_template to its tokenizer_config.json (or chat_template.jinja)"
    )


def _broken_template(name: str, err: BaseException, system_prompt: str | None = None) -> UserError:
    detail = " ".join(str(err).split())[:200] or "no message"
    hint = "; or drop --system-prompt (the template may not take a system turn)" if system_prompt else ""
    return UserError(
        f"the chat template of {name} fails ({type(err).__name__}: {detail}): fix or replace the chat_template "
        f"in its tokenizer_config.json (or chat_template.jinja){hint}"
    )


def _apply_template(tokenizer: Any, messages: list[dict], tokenize: bool, name: str | None = None) -> Any:
    """``apply_chat_template`` with the generation prompt: every prompt goes through here, so a missing template,
    or one that raises or does not parse, is one line naming the model (jinja's errors), never a traceback."""
    name = name or model_name(tokenizer)
    if not has_chat_template(tokenizer):
        raise _no_template(name)
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, **template_kwargs(tokenizer)
        )
    except TemplateError as err:
        system = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
        raise _broken_template(name, err, system) from err


def check_chat_template(
    tokenizer: Any, name: str | None = None, system_prompt: str | None = None, vocab_rows: int | None = None
) -> list[int]:
    """Before any work: the model's chat template renders a user turn (with ``system_prompt``) into token ids
    its embedding has rows for. One line naming ``name`` (the model) and the fix; returns the ids."""
    name = name or model_name(tokenizer)
    messages = chat_messages("Hello! How are you today?", system_prompt)
    try:
        _apply_template(tokenizer, messages, tokenize=False, name=name)
        ids = encode_messages(tokenizer, messages)
    except UserError:
        raise
    except Exception as err:  # a template's own failure: jinja, the template's code, a renderer of the model's
        raise _broken_template(name, err, system_prompt) from err
    if vocab_rows is not None and ids and max(ids) >= vocab_rows:
        raise UserError(
            f"{name}: its chat template gives token id {max(ids)}, but its embedding has {vocab_rows} rows; "
            "the tokenizer does not belong to these weights: copy the model's own tokenizer files"
        )
    return ids


def encode_messages(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ready for the assistant's next answer.

    A conversation longer than the model's context is refused with a one-line
    error (running it crashed the batched prefill with a segfault). Refusing,
    not truncating: a cut prompt means something else, and cutting it would
    remove the generation prompt where the probe and the answer begin.
    """
    ids = _apply_template(tokenizer, messages, tokenize=True)
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


def vocab_rows(config: dict) -> int | None:
    """The embedding's rows as config.json gives them (``vocab_size``, a multimodal model's ``text_config``'s)."""
    for section in (config.get("text_config"), config):
        value = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def template_check(name: str, system_prompt: str | None = None) -> Callable[[Any, dict], None]:
    """``load_model``'s ``check_tokenizer`` for a model that reads prompts: ``check_chat_template`` before its
    weights are read, the embedding's rows from its config."""

    def check(tokenizer: Any, config: dict) -> None:
        check_chat_template(tokenizer, name, system_prompt, vocab_rows(config))

    return check


def _render_raw(tokenizer: Any, messages: list[dict]) -> str:
    return _apply_template(tokenizer, messages, tokenize=False)


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
