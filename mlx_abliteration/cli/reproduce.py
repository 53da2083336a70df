"""``mlx-abliterate run --reproduce LOG``: re-run a recorded abliteration and compare the weights' SHA256."""

from __future__ import annotations

import argparse
import json
import sys

from mlx_abliteration.cli.console import Console
from mlx_abliteration.config import schema
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.errors import UserError
from mlx_abliteration.pipeline import reproduce
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.runtime.logging_config import setup_logging

MISMATCH_EXIT = 3  # the run worked, but the weights differ from the log


def typed_settings(args: argparse.Namespace) -> dict:
    """Only the settings typed on the command line (they override the recorded ones: -o, --no-eval, --cache-dir)."""

    known = set(AbliterationConfig().to_dict())
    return {k: v for k, v in vars(args).items() if k in known and k not in schema.NON_CONFIG and v is not None}


def main(args: argparse.Namespace) -> int:
    if args.auto or args.plan_json or getattr(args, "config_file", None):
        raise UserError("--reproduce takes its settings from the log; drop --auto, --plan-json and --config")
    job, recorded = reproduce.prepare(args.reproduce, typed_settings(args))
    for line in job.warnings:
        print(f"warning: {line}", file=sys.stderr)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        result = run_pipeline(job.config, console, plan_source=job.plan_source)
    finally:
        console.close_bars()
    check = reproduce.compare_weights(recorded, result.record)
    if args.json:
        print(
            json.dumps(
                {
                    "event": "reproduce",
                    "output_dir": result.output_dir,
                    "match": check["match"],
                    "files": check["files"],
                    "warnings": job.warnings,
                }
            )
        )
    else:
        n = len(check["files"])
        if check["match"]:
            print(
                f"reproduced {args.reproduce} into {result.output_dir}: all {n} weight file(s) have the recorded SHA256"
            )
        else:
            differ = [name for name, f in check["files"].items() if not f["match"]]
            print(
                f"reproduced {args.reproduce} into {result.output_dir}: {len(differ)} of {n} weight file(s) differ from the log: {', '.join(differ)}"
            )
    return 0 if check["match"] else MISMATCH_EXIT
