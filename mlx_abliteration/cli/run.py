"""``mlx-abliterate run``: the full pipeline (the seed's ``python cli.py``)."""

from __future__ import annotations

import argparse
import json

from mlx_abliteration.cli import reproduce, search
from mlx_abliteration.cli.console import Console
from mlx_abliteration.cli.upload import add_upload_flags, upload_folder
from mlx_abliteration.config import flags as options
from mlx_abliteration.config import schema
from mlx_abliteration.evaluation.tables import layer_table
from mlx_abliteration.export.hub_upload import check_repo_id, get_token
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.runtime.logging_config import setup_logging

HELP = "probe, compute the refusal direction, ablate, evaluate and save (the full pipeline)"
DESCRIPTION = (
    "Abliterate a chat model: probe harmful/harmless prompts, compute the refusal direction per "
    "layer, orthogonalize every residual-stream writer against it, evaluate refusals and KL before "
    "and after on held-out prompts, and save an MLX model that mlx_lm.load opens."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config_arguments(parser)
    parser.add_argument(
        "--auto",
        action="store_true",
        help="search the plan automatically (`mlx-abliterate search` with its defaults) and save the chosen trial",
    )
    parser.add_argument(
        "--plan-json",
        help="use this plan spec (JSON, or an abliteration_log.json from `search`) instead of the layer choice and strength",
    )
    parser.add_argument(
        "--reproduce",
        metavar="LOG",
        help="re-run a saved model's abliteration_log.json with its recorded settings, prompts (refused if their contents changed) and plan into -o, and report whether the weights' SHA256 match (exit 3 if not)",
    )

    add_upload_flags(parser.add_argument_group("upload (after saving)"), repo_flag="--upload-repo")
    options.add_output_style(parser)


def main(args: argparse.Namespace) -> int:
    if args.reproduce:
        return reproduce.main(args)
    config = schema.config_from_args(args)
    if args.upload_repo:  # before minutes of work: a bad repo id or a missing token fails now
        check_repo_id(args.upload_repo)
        if not config.dry_run:
            get_token()
    if args.auto or args.plan_json:
        code = (
            search.plan_main(args, config)
            if args.plan_json
            else search.search_main(args, config, search.settings_from_args(args))
        )
        return _upload(args, config) if code == 0 else code
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        result = run_pipeline(config, console)
    finally:
        console.close_bars()
    if args.json:
        print(
            json.dumps(
                {
                    "event": "result",
                    "output_dir": result.output_dir,
                    "chosen_layer": result.chosen_layer,
                    "before": result.before,
                    "after": result.after,
                },
                default=str,
            )
        )
    elif config.dry_run and args.quiet:
        print(layer_table(result.layer_stats, result.chosen_layer))
    elif result.output_dir:
        print(f"saved abliterated model (direction from layer {result.chosen_layer}) to {result.output_dir}")
    else:
        print(f"dry run: direction from layer {result.chosen_layer}; nothing written")
    return _upload(args, config)


def _upload(args: argparse.Namespace, config) -> int:
    """``--upload-repo``: upload the saved output (a dry run prints what would be uploaded: nothing was saved)."""
    if not args.upload_repo or config.dry_run or not config.output_dir:
        return 0

    return upload_folder(config.output_dir, args)
