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
from typing import TYPE_CHECKING, Any

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.errors import UserError

if TYPE_CHECKING:
    from mlx_abliteration.pipeline.steps import PromptSets
    from mlx_abliteration.probe.directions import RefusalDirections

log = logging.getLogger("mlx_abliteration.pipeline.flow")


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
    chosen_layer: int | None  # None when the plan source chose nothing (a search without -o)
    layer_stats: list[dict]
    before: dict | None
    after: dict | None
    record: dict  # what abliteration_log.json holds (as written, when saved)
    directions: object = None  # core.directions.RefusalDirections


EventSink = Callable[[Event], None]


def release_buffer_cache() -> None:
    """Hand MLX's cached buffers back between phases (and after a run).

    MLX keeps freed buffers for reuse; on a GPU the cache grew to 135 GiB of a
    141 GiB card over one run although its peak use was 31 GiB. Each phase
    starts from what is really in use, so the process holds no more than that.
    """
    import sys

    if "mlx.core" in sys.modules:  # nothing to release before MLX is used (and no import just for this)
        sys.modules["mlx.core"].clear_cache()


class Reporter:
    """Progress of a flow as ``Event``s to one sink (the CLI's ``Console``, the GUI's stream, a list in tests).

    ``emit`` also logs every non-progress event (JSON log) and, like ``progress``, raises ``Cancelled``
    once ``cancel`` is set, so a run stops at its next step or progress update.
    """

    def __init__(self, on_event: EventSink | None = None, cancel: threading.Event | None = None):
        self.on_event = on_event or (lambda event: None)
        self.cancel = cancel

    def emit(self, kind: str, message: str = "", **data: Any) -> None:
        if kind != "done":  # once saved, a late cancel must not report failure
            self.check()
        if kind in ("stage", "done"):
            release_buffer_cache()
        if kind != "progress":
            log.info(message, extra={"extra_info": {"event": kind, **data}})
        self.on_event(Event(kind, message, data))

    def progress(self, done: int, total: int, what: str) -> None:
        self.emit("progress", what, done=done, total=total, what=what)

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user")


@dataclass
class RunContext:
    """What a plan source sees: the settings, the reporter, the resolved model and what was loaded."""

    config: AbliterationConfig
    report: Reporter
    source: Path
    model: object = None  # None when the plan source never loads the model (ablate)
    tokenizer: object = None
    model_config: dict = field(default_factory=dict)
    writers: dict | None = None  # the residual writers, found right after load
    data: PromptSets | None = None  # when the model is loaded

    def prompt_sets(self) -> PromptSets:
        """The prompts; read right after the model is loaded (a plan source that never loads it has none)."""
        if self.data is None:
            raise RuntimeError("no prompts: they are read once the model is loaded")
        return self.data


@dataclass
class PlanChoice:
    """The edit to make: the plan, the layer its direction comes from, and what the log records about the choice."""

    layer: int
    plan: object  # engine.orthogonalize.AblationPlan
    candidates: list = field(default_factory=list)  # auto layer scores
    record: dict = field(default_factory=dict)  # entries added to abliteration_log.json


class PlanSource:
    """Where the edit plan comes from. ``run_pipeline`` calls, in order: ``check(config)`` before any work,
    ``prepare(ctx)`` once the model is resolved (before it is loaded), ``directions(ctx)`` once the
    writers are found and the prompts read, and ``choose(ctx, directions)``: a ``PlanChoice``, or None
    when there is nothing to evaluate or save (a search without -o)."""

    loads_model = True  # False: the model is never loaded (writers found lazily, edited while saving)
    output_optional = False  # True: without -o the flow still runs (search) instead of failing

    def inputs(self) -> list:
        """Input files besides the model and datasets (an output may never be one of them)."""
        return []

    def check(self, config: AbliterationConfig) -> None:
        pass

    def prepare(self, ctx: RunContext) -> None:
        pass

    def directions(self, ctx: RunContext) -> RefusalDirections:
        from mlx_abliteration.pipeline import steps

        return steps.probe_directions(ctx.model, ctx.tokenizer, ctx.prompt_sets(), ctx.config, ctx.report, ctx.source)

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice | None:
        raise NotImplementedError


class LayerChoice(PlanSource):
    """``run``: one probed layer's direction (``--use-layer``: an index, a fraction or ``auto``), uniform strength."""

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice:
        from mlx_abliteration.pipeline import steps

        layer, candidates = steps.choose_layer(
            ctx.model, ctx.tokenizer, directions, ctx.prompt_sets(), ctx.config, ctx.source, ctx.report, ctx.writers
        )
        return PlanChoice(layer, steps.build_plan(directions, layer, ctx.config, ctx.writers), candidates)


class DirectionFile(PlanSource):
    """``ablate``: a saved direction file (its chosen layer, or ``use_layer``); no probing, no evaluation,
    and the model is never loaded: writers are found one layer at a time and weights edited while saving."""

    loads_model = False

    def __init__(self, path: str | Path, use_layer: str | None = None):
        self.path, self.use_layer = path, use_layer
        self.loaded: tuple[RefusalDirections, int] | None = None  # set by check()

    def inputs(self) -> list:
        return [self.path]

    def check(self, config: AbliterationConfig) -> None:
        from mlx_abliteration.probe.directions import load_directions, parse_use_layer

        directions, layer = load_directions(self.path)
        if self.use_layer is not None:
            chosen = parse_use_layer(self.use_layer, directions.num_model_layers)
            if not isinstance(chosen, int) or chosen not in directions.layers:  # "auto" or not probed
                raise UserError(
                    f"--use-layer {self.use_layer}: choose one of the probed layers {directions.layers[0]}..{directions.layers[-1]}"
                )
            layer = chosen
        self.loaded = directions, layer

    def _loaded(self) -> tuple[RefusalDirections, int]:
        if self.loaded is None:
            raise RuntimeError("DirectionFile.check() loads the direction file first")
        return self.loaded

    def prepare(self, ctx: RunContext) -> None:
        from mlx_abliteration.io.model_io import read_config

        directions = self._loaded()[0]
        num_layers = read_config(ctx.source).get("num_hidden_layers")
        if num_layers is not None and num_layers != directions.num_model_layers:
            raise UserError(
                f"the direction file was made for a {directions.num_model_layers}-layer model, but {ctx.source} has {num_layers} layers"
            )

    def directions(self, ctx: RunContext) -> RefusalDirections:
        return self._loaded()[0]

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice:
        from mlx_abliteration.pipeline import steps

        layer = self._loaded()[1]
        plan = steps.build_plan(directions, layer, ctx.config, ctx.writers)
        return PlanChoice(layer, plan, record={"command": "ablate", "direction_file": str(self.path)})


def run_pipeline(
    config: AbliterationConfig,
    on_event: EventSink | None = None,
    cancel: threading.Event | None = None,
    plan_source: PlanSource | None = None,
) -> PipelineResult:
    """The one abliteration flow (``run``, ``run --plan-json``, ``search``, ``ablate``, the GUI, ``probe``).

    resolve -> check the output -> load -> find the residual writers -> prompts -> directions
    (``plan_source``: probe, a study's cache, a file) -> choose the plan (``plan_source``: fixed or auto
    layer by default, a plan spec, a search trial, a direction file) -> evaluate before/after
    (unless ``--no-eval`` or ``--dry-run``) -> save the model, ``abliteration_log.json``, the direction,
    the model card and ``evaluation_responses.jsonl``. ``--dry-run`` stops after the plan is chosen.
    """
    from mlx_abliteration.pipeline import steps

    plan_source = plan_source or LayerChoice()
    report = Reporter(on_event, cancel)
    started = time.perf_counter()
    if not config.dry_run and not config.output_dir and not plan_source.output_optional:
        raise UserError(
            "no output dir; pass -o/--output-dir" + (" (or --dry-run to only probe)" if plan_source.loads_model else "")
        )
    write = bool(config.output_dir) and not config.dry_run
    plan_source.check(config)
    steps.judge_path(config)  # a bad --judge fails before the model is resolved
    source = steps.resolve_model(config, report, plan_source.inputs())
    if write:
        steps.check_output(source, config)
    ctx = RunContext(config, report, source)
    plan_source.prepare(ctx)
    if plan_source.loads_model:
        ctx.model, ctx.tokenizer, ctx.model_config = steps.load(source, report, config)
    else:
        from mlx_abliteration.io.model_io import read_config

        ctx.model_config = read_config(source)
    ctx.writers = steps.find_writers(ctx.model, source, config, report)
    if plan_source.loads_model:
        ctx.data = steps.prompts(config, report)
    directions = plan_source.directions(ctx)
    choice = plan_source.choose(ctx, directions)
    before = after = None
    output, record = None, {}
    if choice is not None:
        if ctx.model is not None and not config.dry_run:
            reference, before = steps.evaluate_before(
                ctx.model, ctx.tokenizer, ctx.prompt_sets(), config, report, source
            )
            after = steps.evaluate_after(
                ctx.model, ctx.tokenizer, choice.plan, ctx.prompt_sets(), reference, config, source, report
            )
        record = steps.build_record(
            config,
            source,
            ctx.model_config,
            directions,
            choice.layer,
            choice.candidates,
            choice.plan,
            before,
            after,
            started,
        )
        record.update(choice.record)
        if ctx.data is not None:  # the prompts' contents, so `run --reproduce` can refuse changed ones
            from mlx_abliteration.pipeline.reproduce import prompt_digests

            record["prompts_sha256"] = prompt_digests(config)
        if write:
            # The save reads the source files, not the loaded model: drop the model first, so its float32
            # copy (2x the weights on a CPU) and the shards being edited are not in memory together.
            ctx.model = None
            release_buffer_cache()
            responses = steps.responses_jsonl(before, after)
            output, record = steps.save(
                source, config, choice.plan, directions, choice.layer, record, report, responses
            )
    report.emit("done", f"finished in {time.perf_counter() - started:.0f}s", output_dir=output)
    return PipelineResult(
        output,
        choice.layer if choice else None,
        [s.to_dict() for s in directions.stats],
        before and before.to_dict(),
        after and after.to_dict(),
        record,
        directions,
    )


def iter_events(config: AbliterationConfig, cancel: threading.Event | None = None) -> Iterator[Event]:
    """Run the pipeline in a worker thread, yielding its events as they happen.

    The last event is ``done`` (with the ``PipelineResult`` in ``data["result"]``)
    or ``error`` (with a one-line message).
    """
    events: queue.Queue[Event | None] = queue.Queue()
    cancel = cancel or threading.Event()

    def work() -> None:
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
        release_buffer_cache()  # the run's model is gone; a long-lived GUI process keeps nothing of it


def output_weights_path(output_dir: str | Path) -> Path:
    """The file that names the saved model: the index if sharded, else model.safetensors."""
    output_dir = Path(output_dir)
    index = output_dir / "model.safetensors.index.json"
    return index if index.exists() else output_dir / "model.safetensors"
