"""Replace a function wherever the package bound it (``from X import f`` binds a name in each importer)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import pytest


def patch_everywhere(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, replacement: Any) -> None:
    """``module.name`` and every ``mlx_abliteration`` module's binding of the same object become ``replacement``."""
    original = getattr(module, name)
    for loaded in list(sys.modules.values()):
        if loaded is not None and loaded.__name__.startswith("mlx_abliteration"):
            if getattr(loaded, name, None) is original:
                monkeypatch.setattr(loaded, name, replacement)
    monkeypatch.setattr(module, name, replacement)
