"""Typed views of MLX results whose stubs are wider than what the code gets.

``mx.array.item()`` is typed ``int | float | complex`` and ``tolist()`` a
nested union; ``mlx.utils.tree_flatten`` returns a list *or* a dict (the
dict only when a dict ``destination`` is passed). These helpers narrow them
once, checking at run time what the stubs cannot know.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten


def scalar(a: mx.array) -> float:
    """The value of a real one-element array as a float (``float(a.item())``)."""
    value = a.item()
    if isinstance(value, complex):
        raise TypeError(f"expected a real scalar, got {value!r}")
    return float(value)


def int_scalar(a: mx.array) -> int:
    """The value of a real one-element array as an int (``int(a.item())``)."""
    value = a.item()
    if isinstance(value, complex):
        raise TypeError(f"expected a real scalar, got {value!r}")
    return int(value)


def float_list(a: mx.array) -> list[float]:
    """The values of a real 1-D array as floats (``a.tolist()``, each made a float)."""
    values = a.tolist()
    if not isinstance(values, list):
        raise TypeError(f"expected a 1-D array, got shape {a.shape}")
    return [float(cast(float, v)) for v in values]


def int_list(a: mx.array) -> list[int]:
    """The values of a real 1-D array as ints (``a.tolist()``, each made an int)."""
    values = a.tolist()
    if not isinstance(values, list):
        raise TypeError(f"expected a 1-D array, got shape {a.shape}")
    return [int(cast(int, v)) for v in values]


def flat_params(tree: Any) -> list[tuple[str, mx.array]]:
    """``tree_flatten(tree)`` of a parameter tree: (dotted name, array) pairs.

    Without a ``destination`` tree_flatten always returns a list; the leaves
    of a module's ``parameters()`` are arrays.
    """
    return cast("list[tuple[str, mx.array]]", tree_flatten(tree))


def load_arrays(path: str) -> dict[str, mx.array]:
    """``mx.load(path)`` of a multi-tensor file (safetensors, npz): name -> array."""
    loaded = mx.load(path, stream=mx.cpu)  # host I/O (see model_io.load_model)
    if not isinstance(loaded, dict):
        raise TypeError(f"{path} holds a single array, not named tensors")
    return loaded


def load_with_metadata(path: str) -> tuple[dict[str, mx.array], dict[str, str]]:
    """``mx.load(path, return_metadata=True)`` of a safetensors file: (tensors, string metadata)."""
    loaded = mx.load(path, return_metadata=True, stream=mx.cpu)
    if not isinstance(loaded, tuple):
        raise TypeError(f"{path} gave no metadata")
    return loaded
