"""``mlx-abliterate ablate``: apply a saved refusal direction to a model, streaming."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import options

HELP = "orthogonalize a model against a saved refusal direction and save it (no probing)"
DESCRIPTION = (
    "Apply a direction file written by `mlx-abliterate probe` (or by a previous run) to a model: "
    "every residual-stream writer is edited shard by shard, so the model is never fully loaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser)
    parser.add_argument("--direction", required=True, help="refusal_direction.safetensors file (or a dir holding one)")
    parser.add_argument("--use-layer", default=None, help="use this probed layer's direction instead of the file's chosen layer")
    options.add_ablation_options(parser)
    options.add_output_style(parser)


def ablate(config, direction_file: str | Path, use_layer: str | None = None, on_event=None) -> dict:
    """Library form of the command; returns the save summary."""
    from .. import steps
    from ..core.directions import direction_file_contents, load_directions, parse_use_layer
    from ..core.model_card import model_card
    from ..core.model_io import read_config, save_ablated_model
    from ..errors import UserError
    from ..pipeline import Reporter

    report = Reporter(on_event, None)
    if not config.output_dir:
        raise UserError("no output dir; pass -o/--output-dir")
    steps.check_paths(config, extra_sources=[direction_file])
    directions, layer = load_directions(direction_file)
    source = steps.resolve_model(config, report)
    num_layers = read_config(source).get("num_hidden_layers")
    if num_layers is not None and num_layers != directions.num_model_layers:
        raise UserError(f"the direction file was made for a {directions.num_model_layers}-layer model, but {source} has {num_layers} layers")
    if use_layer is not None:
        layer = parse_use_layer(use_layer, directions.num_model_layers)
        if layer == "auto" or layer not in directions.layers:
            raise UserError(f"--use-layer {use_layer}: choose one of the probed layers {directions.layers[0]}..{directions.layers[-1]}")
    writers = steps.find_writers(None, source, config, report)  # the model is opened lazily, one layer at a time
    plan = steps.build_plan(directions, layer, config, writers)
    record = {
        "tool": "mlx-abliteration", "command": "ablate", "source_model": str(config.model),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parameters": config.to_dict(),
        "direction_file": str(direction_file), "chosen_layer": layer, "layer_stats": [s.to_dict() for s in directions.stats],
        "plan": plan.to_dict(), "metrics": {}, "versions": steps.versions(),
    }  # fmt: skip
    report.emit("stage", f"saving to {config.output_dir}")
    return save_ablated_model(
        source, config.output_dir, plan, overwrite=config.overwrite, edited_precision=config.edited_precision,
        record=record, directions=direction_file_contents(directions, layer), model_card=model_card(record),
        progress=report.progress,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from ..core.logging_config import setup_logging
    from .console import Console

    config = options.config_from_args(args)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        summary = ablate(config, args.direction, args.use_layer, console)
    finally:
        console.close_bars()
    print(f"saved abliterated model ({len(summary['reports'])} matrices edited) to {summary['output_dir']}")
    return 0
