"""Where in a prompt the residual stream is read (the one place for this logic).

Positions, for a prompt rendered through the chat template with the
generation prompt appended:
  last          the last prompt token: where the first answer token is predicted
  marker        the last token of the end-of-turn marker closing the user turn
  after-marker  the token right after that marker
  span          mean over the marker and every token after it (the
                post-instruction template tokens, as in Arditi et al.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_abliteration.config.defaults import PROBE_POSITIONS
from mlx_abliteration.data.chat import encode_chat, extract_eot_from_chat_template, render_chat
from mlx_abliteration.errors import UserError


@dataclass(frozen=True)
class ProbeSpec:
    position: str = "last"
    marker: str | None = None
    strip_marker_newline: bool = False
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.position not in PROBE_POSITIONS:
            raise UserError(f"unknown probe position {self.position!r}; choose one of {', '.join(PROBE_POSITIONS)}")

    @property
    def needs_marker(self) -> bool:
        return self.position != "last"


def resolve_marker(tokenizer: Any, spec: ProbeSpec) -> str | None:
    """The marker string to search for: --probe-marker, else from the chat template."""
    if not spec.needs_marker and spec.marker is None:
        return None
    marker = spec.marker
    if marker is None:
        marker = extract_eot_from_chat_template(getattr(tokenizer, "chat_template", None))
        if marker is None:
            raise UserError(
                "no end-of-turn marker found in the chat template; pass --probe-marker or use --probe-position last"
            )
    if spec.strip_marker_newline and marker.endswith("\n"):
        marker = marker[:-1]
    if not marker:
        raise UserError("--probe-marker is empty after stripping the newline; pass a non-empty marker")
    return marker


def _hf_tokenizer(tokenizer: Any) -> Any:
    return getattr(tokenizer, "_tokenizer", tokenizer)


def marker_token_span(tokenizer: Any, text: str, marker: str) -> tuple[int, int, list[int]]:
    """(first, last) token index of the last occurrence of ``marker`` in ``text``."""
    start_char = text.rfind(marker)
    if start_char < 0:
        raise UserError(f"probe marker {marker!r} does not occur in the chat-templated prompt; check --probe-marker")
    end_char = start_char + len(marker) - 1
    enc = _hf_tokenizer(tokenizer)(text, add_special_tokens=False, return_offsets_mapping=True)
    first = last = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if first is None and a <= start_char < b:
            first = i
        if a <= end_char < b:
            last = i
            break
    if first is None or last is None:
        raise UserError(f"cannot map probe marker {marker!r} to tokens; use --probe-position last")
    return first, last, list(enc["input_ids"])


def probe_positions(tokenizer: Any, prompt: str, spec: ProbeSpec, marker: str | None) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt and the positions to read there."""
    ids = encode_chat(tokenizer, prompt, spec.system_prompt)
    if spec.position == "last":
        return ids, [len(ids) - 1]
    if marker is None:
        raise ValueError(f"--probe-position {spec.position} needs a marker (resolve_marker gives one)")
    text = render_chat(tokenizer, prompt, spec.system_prompt)
    first, last, offset_ids = marker_token_span(tokenizer, text, marker)
    if offset_ids != ids:
        raise UserError(
            "the tokenizer encodes the rendered chat text differently from apply_chat_template; "
            "marker positions are ambiguous: use --probe-position last"
        )
    if spec.position == "marker":
        return ids, [last]
    if spec.position == "after-marker":
        if last + 1 >= len(ids):
            raise UserError(f"nothing follows the marker {marker!r} in the prompt; use --probe-position marker")
        return ids, [last + 1]
    return ids, list(range(first, len(ids)))
