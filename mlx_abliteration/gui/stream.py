"""``run_abliteration_stream``: the start button, streaming pipeline events as UI updates.

The GUI only turns form values into an ``AbliterationConfig`` and renders the
pipeline's events; probing, ablation, evaluation and saving all happen in
``mlx_abliteration.pipeline.flow``, exactly as for the CLI.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

from mlx_abliteration.config import schema
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.tables import EVAL_COLUMNS, eval_rows, layer_table
from mlx_abliteration.gui.plots import layer_figure
from mlx_abliteration.pipeline.events import Event
from mlx_abliteration.pipeline.flow import iter_events, output_weights_path

# Progress events can come by the thousand on a real model; redraw at most this often.
PROGRESS_INTERVAL_S = 0.25
INT_SETTINGS = frozenset(f.name for f in fields(AbliterationConfig) if str(f.type) in ("int", "int | None"))
VERBATIM_SETTINGS = frozenset({"probe_marker", "system_prompt"})  # whitespace may matter
ZERO_MEANS_AUTO = frozenset({"batch_size"})  # a browser's empty number field sends 0


class RunView(NamedTuple):
    """One update of the run's outputs, in the order the app binds them."""

    status: str  # Markdown
    progress: str  # HTML progress bar
    log: str
    metrics: Any  # pandas DataFrame (metric, before, after), or gr.skip() when unchanged
    plot: Any  # matplotlib Figure, or gr.skip() when unchanged / not yet known
    output_path: str


def run_abliteration_stream(
    model: str,
    output_dir: str = "",
    harmful_upload: str | None = None,
    harmless_upload: str | None = None,
    cancel: threading.Event | None = None,
    output_root: str | Path | None = None,
    **settings: Any,
) -> Iterator[RunView]:
    """Run the pipeline for the form's values, yielding a ``RunView`` per visible change.

    ``settings`` are ``AbliterationConfig`` fields; blank values keep their
    defaults. An uploaded dataset file replaces the typed dataset. Setting
    ``cancel`` stops the run at its next step; nothing is written then. The
    output must lie inside ``output_root`` (default: ``./outputs``).
    """
    run = _RunState()
    try:
        config = build_config(model, output_dir, harmful_upload, harmless_upload, output_root=output_root, **settings)
    except UserError as err:
        yield run.failed(str(err))
        return
    run.log.append(f"output: {config.output_dir}" if not config.dry_run else "dry run: nothing will be written")
    yield run.view()
    cancel = cancel or threading.Event()
    last_draw = 0.0
    for event in iter_events(config, cancel):
        if event.kind == "result":
            yield run.finished(event.data["result"])
        elif event.kind == "error":
            yield run.cancelled() if cancel.is_set() else run.failed(event.message)
        else:
            run.apply(event)
            if event.kind != "progress" or time.monotonic() - last_draw >= PROGRESS_INTERVAL_S:
                last_draw = time.monotonic()
                yield run.view()


def build_config(
    model: str,
    output_dir: str = "",
    harmful_upload: str | None = None,
    harmless_upload: str | None = None,
    output_root: str | Path | None = None,
    **settings: Any,
) -> AbliterationConfig:
    """The pipeline config for the form's values (blank = the engine's default).

    The GUI's output dir must lie inside ``output_root`` (default ``./outputs``):
    anyone who can reach the page can start a run, so a typed path may not
    replace a folder elsewhere (``../../x`` with Overwrite did).
    """
    model = (model or "").strip()
    if not model:
        raise UserError("no model given; enter a local model dir, a .gguf file or a Hugging Face hub id")
    values = {name: _setting(name, value) for name, value in settings.items() if not _blank(name, value)}
    values["model"] = model
    if harmful_upload:
        values["harmful_dataset"] = str(harmful_upload)
    if harmless_upload:
        values["harmless_dataset"] = str(harmless_upload)
    values["output_dir"] = output_in_root(
        (output_dir or "").strip() or default_output_dir(model, output_root), output_root
    )
    config = schema.build_config(values)
    if not config.dry_run:
        confine_output(config.output_dir, output_root)
    return config


DEFAULT_OUTPUT_ROOT = "outputs"


def default_output_dir(model: str, output_root: str | Path | None = None) -> str:
    """``<output root>/<model name>-abliterated`` for a dir, a .gguf file or a hub id."""
    name = Path(model.rstrip("/\\")).name
    name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return str(Path(output_root or DEFAULT_OUTPUT_ROOT) / f"{name}-abliterated")


def _root(output_root: str | Path | None) -> Path:
    return Path(output_root or DEFAULT_OUTPUT_ROOT).expanduser().resolve()


def output_in_root(output_dir: str, output_root: str | Path | None = None) -> str:
    """The output dir a typed name means: a relative name lies in the output root (``my_model`` is
    ``<root>/my_model``), unless it already names a folder inside the root from the working dir (as the
    form's default ``outputs/<name>-abliterated`` does). Absolute paths are kept; ``confine_output`` checks."""
    path = Path(output_dir).expanduser()
    if not output_dir or path.is_absolute():
        return output_dir
    root = _root(output_root)
    if root in (Path.cwd() / path).resolve().parents:
        return output_dir
    return str(root / path)


def confine_output(output_dir: str | Path, output_root: str | Path | None = None) -> Path:
    """``output_dir`` (relative to the working dir) resolved; an error unless it lies inside the root.

    Symlinks are resolved first, so a link inside the root pointing elsewhere does not escape it.
    """
    root = _root(output_root)
    path = Path(output_dir).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if root not in resolved.parents:
        raise UserError(
            f"output dir {output_dir} is outside the GUI's output root {root}; choose a folder inside it "
            "(or start the GUI with `mlx-abliterate gui --output-root DIR`)"
        )
    return resolved


def _blank(name: str, value: Any) -> bool:
    if name in ZERO_MEANS_AUTO and value == 0:
        return True
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, (list, tuple)) and not value)


def _setting(name: str, value: Any) -> Any:
    if isinstance(value, str) and name not in VERBATIM_SETTINGS:
        return value.strip()
    if name in INT_SETTINGS and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{name.replace('_', ' ')} must be a whole number, got {value}")
        return int(value)
    return value


def markdown_text(text: str) -> str:
    """``text`` shown literally in Markdown (paths and messages hold ``_``, ``*``, ``<``...)."""
    return re.sub(r"([\\`*_\[\]<>#|~$])", r"\\\1", text)


def progress_html(done: int, total: int, what: str, counts: bool = True) -> str:
    total = max(int(total), 1)
    label = f"{what}: {int(done)}/{total}" if counts else what
    return (
        f'<div class="mla-progress"><progress value="{int(done)}" max="{total}"></progress> '
        f"<span>{escape(label)}</span></div>"
    )


class _RunState:
    """What the run has shown so far; ``view()`` renders it."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.status = "**Running…**"
        self.progress = ""
        self.evals: dict[str, dict] = {}
        self.layers: dict | None = None
        self.output_path = ""
        self._changed = {"metrics", "plot"}  # clear the previous run's results

    def apply(self, event: Event) -> None:
        if event.kind == "progress":
            self.progress = progress_html(event.data["done"], event.data["total"], event.data["what"])
            return
        if event.kind == "stage":
            self.status = f"**Running:** {event.message}"
        if event.kind == "layers":
            self.layers = event.data
            self._changed.add("plot")
            self.log.append(event.message)
            self.log.append(layer_table(event.data["stats"], event.data.get("chosen"), event.data.get("candidates")))
        elif event.kind == "eval":
            self.evals[event.data["which"]] = event.data["report"]
            self._changed.add("metrics")
            self.log.append(f"[eval] {event.message}")
        elif event.message:
            self.log.append(f"[{event.kind}] {event.message}")

    def finished(self, result) -> RunView:
        self.progress = progress_html(1, 1, "finished", counts=False)
        if result.output_dir:
            self.output_path = str(output_weights_path(result.output_dir))
            self.status = f"**Done.** Abliterated with the direction of layer {result.chosen_layer}; saved to `{self.output_path}`"
        else:
            self.status = (
                f"**Done (dry run).** The direction of layer {result.chosen_layer} was chosen; nothing was written."
            )
        self.evals = {k: v for k, v in (("before", result.before), ("after", result.after)) if v}
        self.layers = {"stats": result.layer_stats, "chosen": result.chosen_layer}
        self._changed |= {"plot", "metrics"}
        return self.view()

    def failed(self, message: str) -> RunView:
        self.status = f"**Error:** {markdown_text(message)}"
        self.log.append(f"[error] {message}")
        return self.view()

    def cancelled(self) -> RunView:
        self.status = "**Cancelled.** The run stopped; nothing was written."
        self.log.append("[cancelled] stopped by the user")
        return self.view()

    def view(self) -> RunView:
        import gradio as gr
        import pandas as pd

        metrics = plot = gr.skip()
        if "metrics" in self._changed:
            rows = eval_rows(self.evals.get("before"), self.evals.get("after")) if self.evals else []
            metrics = pd.DataFrame(rows, columns=list(EVAL_COLUMNS))
        if "plot" in self._changed:
            plot = layer_figure(self.layers["stats"], self.layers.get("chosen")) if self.layers else None
        self._changed.clear()
        return RunView(self.status, self.progress, "\n".join(self.log), metrics, plot, self.output_path)
