"""The one end-to-end flow: resolve -> probe -> directions -> ablate -> evaluate -> save.

``run_pipeline(config, on_event)`` reports progress as ``Event``s; the CLI
prints them, the GUI streams them (``iter_events`` runs the pipeline in a
thread and yields the events as they come).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import AbliterationConfig
from .errors import UserError

log = logging.getLogger("mlx_abliteration.pipeline")


@dataclass
class Event:
    """``kind``: stage | progress | info | layers | eval | done | error."""

    kind: str
    message: str = ""
    data: dict = field(default_factory=dict)


class Cancelled(Exception):
    """Raised inside the pipeline when the caller asked it to stop."""


@dataclass
class PipelineResult:
    output_dir: str | None
    chosen_layer: int
    layer_stats: list[dict]
    before: dict | None
    after: dict | None
    record: dict
    directions: object = None  # core.directions.RefusalDirections


EventSink = Callable[[Event], None]


class Reporter:
    def __init__(self, on_event: EventSink | None = None, cancel: threading.Event | None = None):
        self.on_event = on_event or (lambda event: None)
        self.cancel = cancel

    def emit(self, kind: str, message: str = "", **data) -> None:
        if kind != "done":  # once saved, a late cancel must not report failure
            self.check()
        if kind != "progress":
            log.info(message, extra={"extra_info": {"event": kind, **data}})
        self.on_event(Event(kind, message, data))

    def progress(self, done: int, total: int, what: str) -> None:
        self.emit("progress", what, done=done, total=total, what=what)

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user")


def run_pipeline(
    config: AbliterationConfig, on_event: EventSink | None = None, cancel: threading.Event | None = None
) -> PipelineResult:
    """Run the whole abliteration described by ``config``."""
    from . import steps

    report = Reporter(on_event, cancel)
    started = time.perf_counter()
    if not config.dry_run and not config.output_dir:
        raise UserError("no output dir; pass -o/--output-dir (or --dry-run to only probe)")
    source = steps.resolve_model(config, report)
    if config.output_dir and not config.dry_run:
        steps.check_output(source, config)
    model, tokenizer, model_config = steps.load(source, report, config)
    writers = steps.find_writers(model, source, config, report)
    data = steps.prompts(config, report)
    reference, before = steps.evaluate_before(model, tokenizer, data, config, report)
    directions = steps.probe_directions(model, tokenizer, data, config, report, source)
    layer, candidates = steps.choose_layer(model, tokenizer, directions, data, config, source, report, writers)
    plan = steps.build_plan(directions, layer, config, writers)
    after = steps.evaluate_after(model, tokenizer, plan, data, reference, config, source, report)
    record = steps.build_record(config, source, model_config, directions, layer, candidates, plan, before, after, started)
    output = None
    if not config.dry_run:
        output = steps.save(source, config, plan, directions, layer, record, report, steps.responses_jsonl(before, after))
    report.emit("done", f"finished in {time.perf_counter() - started:.0f}s", output_dir=output)
    return PipelineResult(
        output, layer, [s.to_dict() for s in directions.stats], before and before.to_dict(), after and after.to_dict(), record,
        directions,
    )  # fmt: skip


def iter_events(config: AbliterationConfig, cancel: threading.Event | None = None) -> Iterator[Event]:
    """Run the pipeline in a worker thread, yielding its events as they happen.

    The last event is ``done`` (with the ``PipelineResult`` in ``data["result"]``)
    or ``error`` (with a one-line message).
    """
    events: queue.Queue = queue.Queue()
    cancel = cancel or threading.Event()

    def work():
        try:
            result = run_pipeline(config, events.put, cancel)
            events.put(Event("result", "", {"result": result}))
        except (UserError, FileNotFoundError, Cancelled) as err:
            events.put(Event("error", str(err)))
        except Exception as err:  # unexpected: still end the stream with a message
            log.exception("pipeline failed")
            events.put(Event("error", f"{type(err).__name__}: {err}"))
        finally:
            events.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:
        cancel.set()
        thread.join()


def output_weights_path(output_dir: str | Path) -> Path:
    """The file that names the saved model: the index if sharded, else model.safetensors."""
    output_dir = Path(output_dir)
    index = output_dir / "model.safetensors.index.json"
    return index if index.exists() else output_dir / "model.safetensors"
