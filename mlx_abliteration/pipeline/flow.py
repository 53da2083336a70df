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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.data.prompt_selection import prompt_digests
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_io import read_config
from mlx_abliteration.pipeline import records, steps
from mlx_abliteration.pipeline.events import (
    Cancelled,
    Event,
    EventSink,
    FollowerRankDone,
    Reporter,
    release_buffer_cache,
)
from mlx_abliteration.pipeline.plan_sources import LayerChoice, PlanSource, RunContext
from mlx_abliteration.probe.distributed import world

if TYPE_CHECKING:
    pass

log = logging.getLogger("mlx_abliteration.pipeline")


@dataclass
class PipelineResult:
    output_dir: str | None
    chosen_layer: int | None  # None when the plan source chose nothing (a search without -o)
    layer_stats: list[dict]
    before: dict | None
    after: dict | None
    record: dict  # what abliteration_log.json holds (as written, when saved)
    directions: object = None  # core.directions.RefusalDirections


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

    plan_source = plan_source or LayerChoice()
    report = Reporter(on_event, cancel)
    started = time.perf_counter()
    if not config.dry_run and not config.output_dir and not plan_source.output_optional:
        raise UserError(
            "no output dir; pass -o/--output-dir" + (" (or --dry-run to only probe)" if plan_source.loads_model else "")
        )
    write = bool(config.output_dir) and not config.dry_run
    plan_source.check(config)
    steps.judge_path(config, check=True)  # a bad --judge (or its tokenizer) fails before the model is resolved
    source = steps.resolve_model(config, report, plan_source.inputs())
    if write:
        steps.check_output(source, config)
    ctx = RunContext(config, report, source)
    plan_source.prepare(ctx)
    if plan_source.loads_model:
        ctx.model, ctx.tokenizer, ctx.model_config = steps.load(source, report, config)
    else:
        ctx.model_config = read_config(source)
    ctx.writers = steps.find_writers(ctx.model, source, config, report)
    if plan_source.loads_model:
        ctx.data = steps.prompts(config, report)
    directions = plan_source.directions(ctx)  # under mlx.launch: the ranks' probing statistics merged
    group = world()
    if group.rank() != 0:
        raise FollowerRankDone(group.rank(), group.size())
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
        record = records.build_record(
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
            record["prompts_sha256"] = prompt_digests(config)
        if write:
            # The save reads the source files, not the loaded model: drop the model first, so its float32
            # copy (2x the weights on a CPU) and the shards being edited are not in memory together.
            ctx.model = None
            release_buffer_cache()
            responses = records.responses_jsonl(before, after)
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
