"""``mlx-abliterate probe``: per-layer refusal directions and stats, no weights written."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from mlx_abliteration.cli.console import Console
from mlx_abliteration.config import flags as options
from mlx_abliteration.config import schema
from mlx_abliteration.config.schema import build_config
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import atomic_open, atomic_path, ensure_parent
from mlx_abliteration.io.output_dir import check_cache_dir, check_distinct_outputs, check_output_file, local_sources
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.probe.directions import save_directions
from mlx_abliteration.probe.distributed import is_primary
from mlx_abliteration.runtime.logging_config import setup_logging

HELP = "probe harmful/harmless prompts and save the per-layer refusal directions"
DESCRIPTION = (
    "Run the probing half of the pipeline: capture the residual stream, compute a refusal direction "
    "per layer, choose a layer (--use-layer), print the per-layer table and save the directions to "
    "a safetensors file that `mlx-abliterate ablate --direction` applies later."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser, output=False)
    parser.add_argument("--output", default="refusal_direction.safetensors", help="direction file to write")
    parser.add_argument("--stats-json", help="also write the per-layer statistics as JSON here")
    options.add_dataset_options(parser)
    options.add_probe_options(parser)
    options.add_output_style(parser)


def probe(config, output: str | Path, on_event=None, stats_json: str | Path | None = None):
    """Library form of the command: returns ``(directions, chosen_layer)``.

    The direction file and the stats (``stats_json``) land together: both are written to temporary
    files first, so a failed write (full disk) leaves neither.
    """

    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name ending in .safetensors")
    result = run_pipeline(build_config({"dry_run": True, "no_eval": True, "output_dir": None}, config), on_event)
    directions, layer = result.directions, result.chosen_layer
    if not is_primary():  # under mlx.launch every rank has the merged result; rank 0 writes it
        return directions, layer
    with contextlib.ExitStack() as stack:
        if stats_json:  # written (and flushed: a full disk fails now, named) before the direction file starts
            ensure_parent(stats_json)
            out = stack.enter_context(atomic_open(stats_json))
            out.write(json.dumps({"chosen_layer": layer, "layers": [s.to_dict() for s in directions.stats]}, indent=2))
            out.write("\n")
            out.flush()
        ensure_parent(output)
        tmp = stack.enter_context(atomic_path(output, suffix=".safetensors"))
        save_directions(tmp, directions, layer)
    return directions, layer


def main(args: argparse.Namespace) -> int:
    config = schema.config_from_args(args)
    check_outputs(config, args)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        directions, layer = probe(config, args.output, console, stats_json=args.stats_json)
    finally:
        console.close_bars()
    if not args.json:
        print(f"saved directions of {len(directions.layers)} layers (chosen layer {layer}) to {args.output}")
    return 0


def check_outputs(config, args: argparse.Namespace) -> None:
    """Both output files are checked before probing (a directory, a file in the way, a source)."""

    check_cache_dir(config.cache_dir)
    sources = local_sources(
        config.model,
        config.harmful_dataset,
        config.harmless_dataset,
        args.config_file if "config_file" in args else None,
    )
    check_output_file(args.output, sources=sources, flag="--output")
    check_output_file(args.stats_json, sources=sources, flag="--stats-json")
    check_distinct_outputs(**{"--output": args.output, "--stats-json": args.stats_json})
