"""``mlx-abliterate ablate``: apply a saved refusal direction to a model, streaming."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_abliteration.cli import export_adapter
from mlx_abliteration.cli.console import Console
from mlx_abliteration.config import flags as options
from mlx_abliteration.config import schema
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.pipeline.plan_sources import DirectionFile
from mlx_abliteration.runtime.logging_config import setup_logging

HELP = "orthogonalize a model against a saved refusal direction and save it (no probing)"
DESCRIPTION = (
    "Apply a direction file written by `mlx-abliterate probe` (or by a previous run) to a model: "
    "the residual-stream writers are found on the model's own forward pass (one decoder layer resident at a time) "
    "and edited shard by shard, so the model is never fully loaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser)
    options.add_direction_options(parser)
    options.add_ablation_options(parser)
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="write a rank-1 mlx-lm LoRA adapter (megabytes) instead of a full model copy; "
        "the same as `mlx-abliterate export-adapter`",
    )
    options.add_output_style(parser)


def ablate(config, direction_file: str | Path, use_layer: str | None = None, on_event=None):
    """Library form of the command: the one pipeline with the direction file as its plan source.

    Returns the ``PipelineResult`` (``record`` is the ``abliteration_log.json`` written).
    """

    return run_pipeline(config, on_event, plan_source=DirectionFile(direction_file, use_layer))


def main(args: argparse.Namespace) -> int:
    if args.adapter_only:
        return export_adapter.main(args)

    config = schema.config_from_args(args)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        result = ablate(config, args.direction, args.use_layer, console)
    finally:
        console.close_bars()
    print(f"saved abliterated model ({result.record['edits']['modules']} matrices edited) to {result.output_dir}")
    return 0
