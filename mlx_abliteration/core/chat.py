"""Prompt -> token ids through the model's own chat template (one place)."""

from __future__ import annotations

from collections.abc import Sequence


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_chat(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The chat-template text with the generation prompt appended."""
    return tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=False
    )


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ready for the assistant's next answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_chat(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ready for the first answer token."""
    return encode_messages(tokenizer, chat_messages(prompt, system_prompt))


def encode_chats(tokenizer, prompts: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    return [encode_chat(tokenizer, p, system_prompt) for p in prompts]
