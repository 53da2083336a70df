"""Try a plan without touching the weights: project the writers' outputs instead.

For a writer y = W x + b the edit W' = W - s u (u^T W), b' = b - s u (u^T b)
gives W' x + b' = y - s u (u^T y): the edited module's output is the
original output with its u component scaled by (1 - s). An embedding row
E'[t] = E[t] - s (E[t] u) u^T is the same projection of the looked-up row,
and an embedding tied to the output head gives x E'^T = x E^T - s (x u) (E u)^T.
So a trial (``--use-layer auto``, the search) costs a few vector operations
per writer call instead of rewriting every writer and restoring it (a third
of a trial's time for Qwen2.5-1.5B on the CPU), and keeps no copy of the
original weights (1.5 GB there).

The result equals ``apply_plan``'s up to the rounding of the edited matrices
to the checkpoint's dtype. Not expressible as a projection, so left to
``TrialEditor``: magnitude-preserving edits (they rescale W's columns) and
quantized writers (the saved edit is requantized, and that rounding is part
of what a trial should see). A writer the forward pass never called through
its module (its weights read directly) makes ``check_calls`` fail, so the
caller can fall back as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.edit.in_memory import bind, storage_quant
from mlx_abliteration.edit.orthogonalize import AblationPlan
from mlx_abliteration.probe.writers import Writer
from mlx_abliteration.runtime.hooks import hooks


class WriterNotCalled(RuntimeError):
    """A writer's weights reach the output some other way than its module call."""


def projectable(model: nn.Module, plan: AblationPlan) -> bool:
    """Whether ``plan``'s edits on ``model`` are exactly output projections (see the module doc)."""
    if plan.norm_preserve:
        return False
    plan = bind(model, plan)
    return all(
        storage_quant(module) is None for path, module in model.named_modules() if plan.writers and path in plan.writers
    )


def _project(y: mx.array, u: mx.array, s: float) -> mx.array:
    # y - s u (u^T y) along the last axis, in y's dtype (u is float32).
    u = u.astype(y.dtype)
    return y - (s * (y @ u))[..., None] * u


class ProjectedTrial:
    """``with trial.applied(plan): ...`` runs the model as if ``plan`` were applied."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: dict[str, int] = {}
        self.expected: set[str] = set()

    @contextlib.contextmanager
    def applied(self, plan: AblationPlan) -> Iterator[None]:
        plan = bind(self.model, plan)
        modules = dict(self.model.named_modules())
        pairs: list[tuple[nn.Module, Callable]] = []
        tied: list[tuple[nn.Module, Writer]] = []
        self.calls, self.expected = {}, set()
        for path, writer in (plan.writers or {}).items():
            if plan.writer(path) is None:
                continue
            strength = plan.strength(writer.role, writer.layer)
            u = plan.direction(writer)
            pairs.append((modules[path], self._hook(path, u, strength)))
            self.expected.add(path)
            if writer.rows and hasattr(modules[path], "as_linear"):
                tied.append((modules[path], writer))
        with hooks(pairs), _tied_heads(tied, plan):
            yield

    def _hook(self, path: str, u: mx.array, strength: float) -> Callable:
        def hook(call: Callable, args: tuple, kwargs: dict) -> Any:
            self.calls[path] = self.calls.get(path, 0) + 1
            return _project(call(*args, **kwargs), u, strength)

        return hook

    def check_calls(self) -> None:
        """Raise ``WriterNotCalled`` unless every edited writer ran through its module in the last trial."""
        missing = sorted(self.expected - set(self.calls))
        if missing:
            raise WriterNotCalled(f"{len(missing)} writer(s) never called as modules, e.g. {missing[0]}")


@contextlib.contextmanager
def _tied_heads(tied: list[tuple[nn.Module, Writer]], plan: AblationPlan) -> Iterator[None]:
    """An embedding used as the output head: x E'^T = x E^T - s (x u) (E u)^T."""
    patched = []
    try:
        for module, writer in tied:
            u = plan.direction(writer)
            s = plan.strength(writer.role, writer.layer)
            eu = (module.weight.astype(mx.float32) @ u).astype(module.weight.dtype)
            original = module.as_linear

            def as_linear(
                x: mx.array, original: Callable = original, u: mx.array = u, eu: mx.array = eu, s: float = s
            ) -> mx.array:
                return original(x) - (s * (x @ u.astype(x.dtype)))[..., None] * eu.astype(x.dtype)

            object.__setattr__(module, "as_linear", as_linear)  # the instance attribute shadows the method
            patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("as_linear", None)
