"""``mlx-abliterate search``: Optuna search over ablation plans (refusals vs KL); also ``run --auto`` and ``run --plan-json``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from mlx_abliteration.cli.console import Console
from mlx_abliteration.config import flags as options
from mlx_abliteration.config import schema
from mlx_abliteration.config.defaults import SearchSettings
from mlx_abliteration.edit.strength_schedule import load_plan_spec
from mlx_abliteration.errors import UserError
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.pipeline.plan_sources import PlanFile
from mlx_abliteration.runtime.logging_config import setup_logging
from mlx_abliteration.search.pareto import front_table
from mlx_abliteration.search.runner import run_search

HELP = "search ablation parameters automatically (Optuna: fewest refusals at least KL) and save the best trial"
DESCRIPTION = (
    "Probe once, then run trials that each edit the in-memory model with a plan (direction index as a float "
    "over layers, global or per-layer direction, per-component strength kernels over layers), count refusals "
    "on harmful prompts and measure first-token KL on harmless prompts, and revert. Trials are scored on "
    "prompts disjoint from both the probing and the held-out evaluation prompts. The study is stored on disk: "
    "rerunning the same command continues it (Ctrl-C keeps finished trials). The Pareto front is printed; with "
    "-o, the trial with the fewest refusals among those with KL <= --max-kl is evaluated on the held-out split "
    "and saved (or the trial given by --trial). Search space (L layers): direction_scope global|per-layer; "
    "direction_index 0.3..0.8 of depth (float, interpolated); per component (attn out, mlp out): max_weight "
    "0.8..1.5 at max_weight_position 0.3..0.9 of depth, falling linearly to min_weight (0..1 x max_weight) at "
    "min_weight_distance 0.2..1 x (L-1) layers, 0 beyond; embed_weight 0..1; norm_preserve false|true. "
    "Trials 0 and 1 are the fixed plan of `run` (its auto layer, strength 1) without and with --norm-preserve."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser)
    options.add_dataset_options(parser)
    options.add_probe_options(parser)
    options.add_ablation_options(parser)
    options.add_eval_options(parser)
    add_search_options(parser)
    options.add_output_style(parser)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    d = SearchSettings()
    g = parser.add_argument_group("search")
    g.add_argument(
        "--n-trials",
        type=int,
        default=d.n_trials,
        help="finished trials the study should have; a rerun runs only the missing ones",
    )
    g.add_argument(
        "--n-startup-trials", type=int, default=d.n_startup_trials, help="random trials before TPE starts modelling"
    )
    g.add_argument(
        "--max-kl",
        type=float,
        default=d.max_kl,
        help="save the trial with the fewest refusals among those with KL <= this",
    )
    g.add_argument(
        "--search-prompts",
        type=int,
        default=d.search_prompts,
        help="harmful and harmless prompts (each) scoring a trial",
    )
    g.add_argument(
        "--validation-prompts",
        type=int,
        default=d.validation_prompts,
        help="harmful and harmless prompts (each), disjoint from every other split, on which the best trials and the "
        "fixed default are scored again: the saved trial is chosen there, and the default is kept unless a trial beats "
        "it beyond noise (0: choose on the scoring prompts)",
    )
    g.add_argument(
        "--search-max-tokens",
        type=int,
        default=d.search_max_tokens,
        help="tokens generated per harmful prompt in a trial (stops at the first refusal marker)",
    )
    g.add_argument("--search-seed", type=int, default=d.search_seed, help="sampler seed (default: --seed)")
    g.add_argument("--study-dir", default=d.study_dir, help="where studies are stored (default: <cache dir>/studies)")
    g.add_argument(
        "--study-name",
        default=d.study_name,
        help="study name (default: model name + hash of the settings that change scores)",
    )
    g.add_argument(
        "--trial",
        type=int,
        default=d.trial,
        help="save this finished trial (number from the front table) instead of running more",
    )
    g.add_argument(
        "--no-warm-start",
        dest="warm_start",
        action="store_false",
        help="do not queue the fixed plans of `run` (with and without --norm-preserve) as the first trials",
    )
    g.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        help="finish every trial, even once a finished trial dominates it",
    )


def settings_from_args(args: argparse.Namespace):
    return SearchSettings(**{f.name: getattr(args, f.name) for f in fields(SearchSettings) if hasattr(args, f.name)})


def main(args: argparse.Namespace) -> int:
    return search_main(args, schema.config_from_args(args), settings_from_args(args))


def search_main(args: argparse.Namespace, config, settings) -> int:
    """Run the search and print the front; shared with ``run --auto``."""

    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        outcome = run_search(config, settings, console)
    finally:
        console.close_bars()
    study = outcome.study
    if args.json:
        print(
            json.dumps(
                {
                    "event": "result",
                    "study": study.name,
                    "storage": study.storage,
                    "chosen": outcome.chosen and outcome.chosen.to_dict(),
                    "front": [r.to_dict() for r in study.front],
                    "output_dir": outcome.output_dir,
                    "before": outcome.before,
                    "after": outcome.after,
                },
                default=str,
            )
        )
    else:
        print(front_table(study.front, outcome.chosen, settings.max_kl))
        print(
            f"{len(study.rows)} complete + {len(study.pruned)} stopped early (dominated) trials, {study.seconds_per_trial:.1f}s per trial; "
            f"study {study.name} in {study.storage}"
        )
    if outcome.chosen is None:
        raise UserError(f"no finished trial has KL <= {settings.max_kl:g}; raise --max-kl or pick one with --trial N")
    if outcome.output_dir:
        print(f"saved trial {outcome.chosen.number} to {outcome.output_dir}")
    elif not args.json:
        print(f"nothing saved; save the chosen trial with: --trial {outcome.chosen.number} -o OUT", file=sys.stderr)
    return 0


def plan_main(args: argparse.Namespace, config) -> int:
    """``run --plan-json FILE``: the pipeline with an explicit plan spec."""

    spec = load_plan_spec(args.plan_json)
    setup_logging(args.log_file)
    console = Console(args.quiet, args.json)
    try:
        result = run_pipeline(config, console, plan_source=PlanFile(spec))
    finally:
        console.close_bars()
    if args.json:
        print(
            json.dumps(
                {
                    "event": "result",
                    "output_dir": result.output_dir,
                    "plan_spec": spec.to_dict(),
                    "before": result.before,
                    "after": result.after,
                },
                default=str,
            )
        )
    elif result.output_dir:
        print(f"saved abliterated model (plan from {args.plan_json}) to {result.output_dir}")
    return 0
