"""The Compare tab: one prompt, answered greedily by the original and the abliterated model."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from mlx_abliteration.data.chat import encode_chat
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.generation import generate_greedy
from mlx_abliteration.gui.stream import markdown_text
from mlx_abliteration.io.asset_resolver import resolve_asset
from mlx_abliteration.io.model_io import check_model_dir, load_model
from mlx_abliteration.pipeline.flow import output_weights_path

log = logging.getLogger("mlx_abliteration.gui")

MAX_LOADED_MODELS = 2  # the original and the abliterated model
_loaded: OrderedDict[tuple[str, int], tuple] = OrderedDict()
_lock = threading.Lock()


def compare_answers(
    original: str, abliterated: str, prompt: str, max_tokens: int, system_prompt: str = "", cache_dir: str = ""
) -> tuple[str, str, str]:
    """``(original answer, abliterated answer, status Markdown)``; errors go to the status."""

    try:
        if not (prompt or "").strip():
            raise UserError("enter a prompt to compare")
        answers = [
            answer(path, prompt, int(max_tokens), system_prompt or None, cache_dir) for path in (original, abliterated)
        ]
    except (UserError, FileNotFoundError) as err:
        return "", "", f"**Error:** {markdown_text(str(err))}"
    except Exception as err:  # unexpected: still a one-line message, details in the log
        log.exception("compare failed")
        return "", "", f"**Error:** {markdown_text(f'{type(err).__name__}: {err}')}"
    return answers[0], answers[1], ""


def answer(path_or_id: str, prompt: str, max_tokens: int, system_prompt: str | None = None, cache_dir: str = "") -> str:
    """The greedy answer of the model at ``path_or_id`` (loaded once, reused while unchanged)."""

    if max_tokens < 1:
        raise UserError(f"max tokens must be at least 1, got {max_tokens}")
    with _lock:
        model, tokenizer = loaded_model(path_or_id, cache_dir)
        tokens = encode_chat(tokenizer, prompt, system_prompt)
        return generate_greedy(model, tokenizer, [tokens], max_tokens, batch_size=1)[0]


def loaded_model(path_or_id: str, cache_dir: str = ""):
    """``(model, tokenizer)``, cached by resolved path and weights mtime (a re-run replaces the files)."""

    path_or_id = (path_or_id or "").strip()
    if not path_or_id:
        raise UserError("enter both models: a local model dir, a .gguf file or a Hugging Face hub id")
    source = Path(
        check_model_dir(resolve_asset(path_or_id, Path(cache_dir.strip()) if (cache_dir or "").strip() else None))
    ).resolve()
    weights = output_weights_path(source)
    key = (str(source), weights.stat().st_mtime_ns if weights.exists() else 0)
    if key not in _loaded:
        _loaded[key] = load_model(source)[:2]
        while len(_loaded) > MAX_LOADED_MODELS:
            _loaded.popitem(last=False)
    _loaded.move_to_end(key)
    return _loaded[key]
