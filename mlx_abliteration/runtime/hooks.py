"""Hook points: route a module's calls through a function, without moving the module.

The module object stays where the model keeps it (its class is swapped for
a subclass whose ``__call__`` goes through the hook), so the model's own
code, its attribute reads, keyword calls and list layouts are untouched,
and a layer is seen however the model reaches it. Always undone on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.nn as nn

_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    sub = _HOOKED.get(cls)
    if sub is None:

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._abliteration_hook(lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs)

        sub = _HOOKED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return sub


@contextlib.contextmanager
def hooks(pairs: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Route each module's calls through ``hook(call, args, kwargs)``; always undone.

    A module takes one hook at a time (hooking it twice is a bug of the caller).
    """
    done: list[tuple[nn.Module, type]] = []
    try:
        for module, hook in pairs:
            if "_abliteration_hook" in module.__dict__:
                raise ValueError(f"{type(module).__name__} is already hooked")
            done.append((module, type(module)))
            module.__class__ = _hooked_class(type(module))
            object.__setattr__(module, "_abliteration_hook", hook)
        yield
    finally:
        for module, cls in reversed(done):
            module.__class__ = cls
            module.__dict__.pop("_abliteration_hook", None)
