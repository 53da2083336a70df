"""``mlx-abliterate export-adapter``: a rank-1 mlx-lm LoRA adapter instead of a full abliterated copy."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from mlx_abliteration.cli.console import Console
from mlx_abliteration.config import flags as options
from mlx_abliteration.config import schema
from mlx_abliteration.errors import UserError
from mlx_abliteration.export.adapter import write_adapter
from mlx_abliteration.io.output_dir import make_temp_dir, replace_dir
from mlx_abliteration.pipeline import records, steps
from mlx_abliteration.pipeline.events import Reporter
from mlx_abliteration.pipeline.plan_sources import DirectionFile, RunContext
from mlx_abliteration.runtime.logging_config import setup_logging

HELP = "write the abliteration as a rank-1 mlx-lm LoRA adapter (megabytes instead of a full copy)"
DESCRIPTION = (
    "Apply a direction file (from `probe` or a previous run) as mlx-lm LoRA adapters: for each residual writer "
    "W' = W + (-s u)(u^T W), so `mlx_lm.generate --model SOURCE --adapter-path OUT` runs the abliterated model. "
    "Embedding rows, biases and MoE expert stacks cannot be expressed by the adapter format; they are listed in "
    "the output and the model card."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser)
    options.add_direction_options(parser)
    options.add_ablation_options(parser)
    options.add_output_style(parser)


def export_adapter(config, direction_file, use_layer=None, on_event=None) -> dict:
    """Library form: returns the adapter summary (modules, keys, size_bytes, not_expressed, output_dir)."""

    if not config.output_dir:
        raise UserError("no output dir; pass -o/--output-dir for the adapter")
    if config.quantize:
        raise UserError("--quantize applies to full models; an adapter runs on its source as it is")
    report, started = Reporter(on_event), time.perf_counter()
    source_plan = DirectionFile(direction_file, use_layer)
    source_plan.check(config)
    source = steps.resolve_model(config, report, source_plan.inputs())
    steps.check_output(source, config)
    source_plan.prepare(RunContext(config, report, source))  # ablate's checks of the file against the model
    model, _, model_config = steps.load(source, report, config, chat=False)  # no prompts
    writers = steps.find_writers(model, source, config, report)
    directions, layer = source_plan.loaded
    plan = steps.build_plan(directions, layer, config, writers)
    record = records.build_record(config, source, model_config, directions, layer, [], plan, None, None, started)
    record.update({"command": "export-adapter", "direction_file": str(direction_file)})
    output = Path(config.output_dir)
    tmp = make_temp_dir(output)
    try:
        summary = write_adapter(tmp, model, plan, record, len(model.layers))
        replace_dir(tmp, output, config.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for item in summary["not_expressed"]:
        report.emit("info", f"not in the adapter: {item}")
    return {**summary, "output_dir": str(output)}


def main(args: argparse.Namespace) -> int:
    config = schema.config_from_args(args)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        summary = export_adapter(config, args.direction, args.use_layer, console)
    finally:
        console.close_bars()
    print(
        f"saved a rank-1 adapter ({summary['modules']} modules, {summary['size_bytes'] / 1e6:.2f} MB) to {summary['output_dir']}"
    )
    for item in summary["not_expressed"]:
        print(f"  not expressible as an adapter (the full model has it): {item}")
    return 0
