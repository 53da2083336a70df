"""Small shared helpers: layer index by parameter name, file digests, the cache dir."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

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


def process_alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host runs (a pid read back from a file may be None or junk: not alive)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True
