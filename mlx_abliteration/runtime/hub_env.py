"""The Hub's timeout settings, read once and made safe before anything imports huggingface_hub.

huggingface_hub parses ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT``
with ``int()`` when it is imported, so ``HF_HUB_ETAG_TIMEOUT=abc`` (or ``2.5``)
made the import itself fail, and with it mlx-lm, transformers and every
command. ``sanitize_hub_timeouts()`` (run when the package is imported, before
any of them is) replaces a value that is not a positive number with the
default and rounds a fractional one up (huggingface_hub takes whole seconds),
so huggingface_hub and ``hub_timeout()`` wait the same time.
"""

from __future__ import annotations

import math
import os

DEFAULT_TIMEOUT = 10.0
TIMEOUT_VARS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


def _seconds(text: str | None) -> float:
    """A timeout in seconds from an environment value; ``DEFAULT_TIMEOUT`` if unset, not a number or not > 0."""
    try:
        value = float(text or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if math.isfinite(value) and value > 0 else DEFAULT_TIMEOUT


def hub_timeout() -> float:
    """Seconds a Hub request may wait for an answer: ``HF_HUB_ETAG_TIMEOUT`` (default 10; junk falls back to it)."""
    return _seconds(os.environ.get("HF_HUB_ETAG_TIMEOUT"))


def sanitize_hub_timeouts() -> dict[str, str]:
    """Rewrite the timeout variables huggingface_hub would fail to parse; returns {name: old value} of those changed."""
    changed = {}
    for name in TIMEOUT_VARS:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            if int(text) > 0:
                continue
        except ValueError:
            pass
        os.environ[name] = str(math.ceil(_seconds(text)))
        changed[name] = text
    return changed
