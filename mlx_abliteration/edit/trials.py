"""Measure a model as if a plan were applied, then leave it as it was: the one trial mechanism.

``--use-layer auto`` and the search score many plans on one loaded model.
Where every edit is an output projection (``projected_trial``) a trial only
hooks the writers; otherwise (magnitude-preserving edits, quantized writers,
a writer whose weights are read outside its call) it edits the weights and
restores them (``TrialEditor``, created on first need: it keeps a copy of
every writer's originals).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.edit.orthogonalize import AblationPlan
from mlx_abliteration.edit.projected_trial import ProjectedTrial, WriterNotCalled, projectable
from mlx_abliteration.edit.revertible_edit import TrialEditor

log = logging.getLogger(__name__)
T = TypeVar("T")


class Trials:
    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[str],
        storage_dtype: mx.Dtype | None = None,
        edited_precision: str | None = None,
        project: bool = True,
    ) -> None:
        self.model, self.project = model, project
        self.projected = ProjectedTrial(model)
        self._new_editor = functools.partial(TrialEditor, model, tuple(targets), storage_dtype, edited_precision)
        self._editor: TrialEditor | None = None

    @property
    def editor(self) -> TrialEditor:
        if self._editor is None:
            self._editor = self._new_editor()
        return self._editor

    def measure(self, plan: AblationPlan, fn: Callable[[], T]) -> T:
        """``fn()`` run on the model as edited by ``plan``; the model is unchanged afterwards."""
        if self.project and projectable(self.model, plan):
            with self.projected.applied(plan):
                result = fn()
            try:
                self.projected.check_calls()
                return result
            except WriterNotCalled as why:  # its weights reach the output another way: edit them instead
                log.info("trials edit the weights: %s", why)
                self.project = False
        self.editor.apply(plan)
        try:
            return fn()
        finally:
            self.editor.restore()
