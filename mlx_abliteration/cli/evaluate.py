"""``mlx-abliterate eval``: refusal rates and KL damage of any model."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
from pathlib import Path

import mlx.core as mx

from mlx_abliteration.cli.console import Console
from mlx_abliteration.config.defaults import GENERATION_BATCH_SIZE as DEFAULT_BATCH_SIZE
from mlx_abliteration.config.defaults import AbliterationConfig, check_count
from mlx_abliteration.config.flags import JUDGE_HELP
from mlx_abliteration.data.chat import template_check
from mlx_abliteration.data.prompt_selection import scan_prompts
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.baseline_cache import baseline_identity, baseline_key, cached_baseline
from mlx_abliteration.evaluation.evaluate import (
    EvalReport,
    ReferenceMismatch,
    eval_settings,
    evaluate_model,
    evaluate_original,
)
from mlx_abliteration.evaluation.judge import judge_identity, resolve_judge
from mlx_abliteration.evaluation.judge_quality import calibrate_judge, judge_reports, quality_record
from mlx_abliteration.evaluation.refusals import DEFAULT_REFUSAL_MARKERS, read_markers_file
from mlx_abliteration.evaluation.tables import eval_text
from mlx_abliteration.io.asset_resolver import resolve_asset
from mlx_abliteration.io.atomic_write import atomic_open, ensure_parent, write_json
from mlx_abliteration.io.model_io import check_model_dir, load_model
from mlx_abliteration.io.output_dir import check_cache_dir, check_distinct_outputs, check_output_file, local_sources
from mlx_abliteration.pipeline.events import Reporter

HELP = "measure refusals (harmful, harmless) and KL divergence against a baseline"
DESCRIPTION = (
    "Greedy answers to held-out harmful and harmless prompts through the chat template; a response "
    "counts as a refusal if it is empty or contains a refusal marker. With --baseline, the baseline "
    "is evaluated too and KL(baseline || model) of the next-token distributions on the harmless "
    "prompts measures the damage (one model in memory at a time). With --judge MODEL a local chat model "
    "also reads every (prompt, answer) pair; the report shows the keyword and judge counts and their agreement."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AbliterationConfig()
    parser.add_argument("-m", "--model", help="model to evaluate: local dir, .gguf file or hub id (required)")
    parser.add_argument(
        "--judge-calibrate",
        metavar="MODEL",
        help="instead of evaluating a model: measure judge MODEL on the shipped hand-labelled answers beside the "
        "keyword markers (correct verdicts, refusal precision and recall), remember it for later --judge runs, "
        "and print it (with --output: as JSON too)",
    )
    parser.add_argument("--baseline", help="original model: its refusals are shown too and KL is measured against it")
    prompts = parser.add_argument_group("prompts (the held-out split that `run` evaluates on, for the same settings)")
    prompts.add_argument(
        "--harmful-dataset", help="harmful prompts: .jsonl/.json/.csv/.txt/.parquet or hub id (default: packaged set)"
    )
    prompts.add_argument("--harmless-dataset", help="harmless prompts, same formats (default: packaged set)")
    prompts.add_argument("--dataset-column", help="column/field holding the prompt")
    prompts.add_argument(
        "--num-prompts",
        type=int,
        default=d.eval_size,
        help="held-out prompts of each kind (fewer if a dataset is smaller)",
    )
    prompts.add_argument("--seed", type=int, default=d.seed, help="seed of the probing/held-out split")
    prompts.add_argument("--system-prompt", help="system message for every prompt")
    parser.add_argument("--max-tokens", type=int, default=d.eval_max_tokens, help="tokens generated per answer")
    parser.add_argument(
        "--kl-tokens", type=int, default=d.kl_tokens, help="KL over this many tokens of the baseline's own answer"
    )
    parser.add_argument(
        "--capability-questions",
        type=int,
        default=d.capability_questions,
        help="short factual/arithmetic questions with exact answers; with --baseline the share the baseline got right that the model still gets right (0 skips)",
    )

    parser.add_argument("--judge", default=d.judge, metavar="keywords|MODEL", help=f"{JUDGE_HELP} (default: {d.judge})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts generated together")
    parser.add_argument("--markers-file", help="refusal markers, one per line, replacing the default list")
    parser.add_argument("--extra-markers", nargs="+", default=[], metavar="MARKER", help="markers added to the list")
    parser.add_argument("--output", help="write the report as JSON to this file")
    parser.add_argument("--responses", help="write every prompt and response as JSON lines to this file")
    parser.add_argument("--cache-dir", help="where hub/GGUF models, datasets and the baseline's evaluation are cached")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="evaluate again instead of reading the cached evaluations of --baseline (shared with `run`) and of the model (same weights, prompts and settings)",
    )


def main(args: argparse.Namespace) -> int:
    if args.judge_calibrate:
        return _calibrate(args)
    if not args.model:
        raise UserError("eval needs -m/--model (the model to evaluate), or --judge-calibrate MODEL")
    _check_numbers(args)
    _check_paths(args)
    judge = resolve_judge(args.judge, args.cache_dir, check=True)  # a bad --judge fails before any model is loaded
    markers = _markers(args)
    harmful, harmless = _eval_prompts(args)
    model_path = _resolve(args.model, args.cache_dir)
    baseline_path = _resolve(args.baseline, args.cache_dir) if args.baseline else None
    settings = dict(
        max_tokens=args.max_tokens, batch_size=args.batch_size, system_prompt=args.system_prompt, markers=markers
    )
    reference, baseline_report, against = None, None, None
    console = Console()
    if baseline_path is not None:
        reference, baseline_report, against = _cached_baseline(
            baseline_path, harmful, harmless, args, settings, console, judge
        )

    def compute() -> tuple[None, EvalReport]:
        report = _evaluate(
            model_path,
            harmful,
            harmless,
            reference,
            args.kl_tokens,
            settings,
            "model",
            console,
            args.capability_questions,
        )
        _judge(
            report, judge, args.judge, console, "model", args.cache_dir
        )  # the model is freed by now: one model in memory
        return None, report

    # The evaluated model's report is cached like the baseline's, keyed also by the baseline it was measured
    # against (its KL): a repeated identical eval only reads both.
    _, report, _ = cached_baseline(
        model_path,
        harmful,
        harmless,
        {**_full_settings(args, settings, judge), "evaluated_against": against},
        compute,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        emit=lambda message: Reporter(console).emit("info", message),
        what="evaluated model",
    )
    console.close_bars()
    print(eval_text(baseline_report, report))
    _write_reports(args, baseline_report, report)
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Output files and the cache dir are checked before anything is evaluated."""

    check_cache_dir(args.cache_dir)
    sources = local_sources(args.model, args.baseline, args.harmful_dataset, args.harmless_dataset, args.markers_file)
    check_output_file(args.output, sources=sources, flag="--output")
    check_output_file(args.responses, sources=sources, flag="--responses")
    check_distinct_outputs(**{"--output": args.output, "--responses": args.responses})


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--num-prompts", args.num_prompts, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--kl-tokens", args.kl_tokens, 1),
        ("--batch-size", args.batch_size, 1),
        ("--capability-questions", args.capability_questions, 0),
    ):
        check_count(flag, value, least)


def _markers(args: argparse.Namespace) -> list[str]:
    markers = list(DEFAULT_REFUSAL_MARKERS)
    if args.markers_file:
        if not Path(args.markers_file).is_file():
            raise UserError(
                f"markers file {args.markers_file} does not exist; pass a text file with one marker per line"
            )
        markers = read_markers_file(args.markers_file)
    markers += args.extra_markers
    if not markers:
        raise UserError(f"{args.markers_file} holds no markers; add one marker per line")
    return markers


def _eval_prompts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The held-out part of each dataset: `run` cuts it first, so it depends only on the seed and size."""

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    sets = []
    for source, kind in ((args.harmful_dataset, "harmful"), (args.harmless_dataset, "harmless")):
        scan = scan_prompts(source, kind, cache_dir, args.dataset_column)  # streamed: only the prompts taken are kept
        sets.append(scan.split(0, min(args.num_prompts, scan.count), args.seed, name=kind)[1])
    return sets[0], sets[1]


def _resolve(path: str, cache_dir: str | None) -> Path:
    return check_model_dir(resolve_asset(path, Path(cache_dir) if cache_dir else None))


def _cached_baseline(
    path: Path, harmful, harmless, args: argparse.Namespace, settings: dict, console, judge: Path | None = None
):
    """The baseline's evaluation from the cache ``run`` shares (the model is not even loaded then), else computed
    (and judged by ``judge``, if given: the cache keeps the judge's verdicts, keyed by the judge); and the
    key of that evaluation, which the evaluated model's KL depends on."""
    full = _full_settings(args, settings, judge)
    reporter = Reporter(console)

    def compute():
        reference, report = _evaluate_baseline(path, harmful, harmless, full, console)
        _judge(report, judge, args.judge, console, "baseline", args.cache_dir)
        return reference, report

    reference, report, _ = cached_baseline(
        path,
        harmful,
        harmless,
        full,
        compute,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        emit=lambda message: reporter.emit("info", message),
    )
    return reference, report, baseline_key(baseline_identity(path, harmful, harmless, full))


def _full_settings(args: argparse.Namespace, settings: dict, judge: Path | None) -> dict:
    return eval_settings(
        kl_tokens=args.kl_tokens,
        capability_questions=args.capability_questions,
        judge=judge_identity(judge),
        **settings,
    )


def _evaluate_baseline(path: Path, harmful, harmless, settings: dict, console):
    """Reference log-probs and report of the baseline, which is freed before the model loads."""

    model, tokenizer, _ = load_model(path, check_tokenizer=template_check(str(path), settings.get("system_prompt")))
    reference, report = evaluate_original(model, tokenizer, harmful, harmless, settings, _progress(console, "baseline"))
    del model, tokenizer
    gc.collect()
    mx.clear_cache()
    return reference, report


def _calibrate(args: argparse.Namespace) -> int:
    """``--judge-calibrate MODEL``: the judge's measured quality on the shipped labels."""
    check_cache_dir(args.cache_dir)
    check_output_file(args.output, sources=local_sources(args.judge_calibrate), flag="--output")
    judge = resolve_judge(args.judge_calibrate, args.cache_dir)
    if judge is None:
        raise UserError("--judge-calibrate needs a judge model (the keyword markers are measured beside it)")
    console = Console()
    quality = calibrate_judge(
        judge,
        args.judge_calibrate,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        progress=_progress(console, f"labels judged by {args.judge_calibrate}"),
    )
    console.close_bars()
    print(quality.line())
    if args.output:
        write_json(args.output, quality_record(quality))
    return 0


def _judge(report, judge: Path | None, name: str, console, label: str, cache_dir: str | None) -> None:
    """``--judge MODEL``: its verdicts added to ``report`` (the judge is loaded for this step only)."""
    if judge is None:
        return
    gc.collect()  # the evaluated model's buffers go back before the judge loads
    mx.clear_cache()
    judge_reports(
        [report],
        judge,
        name,
        cache_dir=cache_dir,
        progress=_progress(console, f"{label} judged by {name}"),
        emit=lambda line: Reporter(console).emit("info", line),
    )


def _evaluate(
    path: Path,
    harmful,
    harmless,
    reference,
    kl_tokens: int,
    settings: dict,
    label: str,
    console,
    args_capability: int = 0,
):
    model, tokenizer, _ = load_model(path, check_tokenizer=template_check(str(path), settings.get("system_prompt")))
    bars = _progress(console, label)
    try:
        report = evaluate_model(
            model,
            tokenizer,
            harmful,
            harmless,
            reference_logprobs=reference,
            kl_tokens=kl_tokens,
            progress=bars,
            capability_questions=args_capability,
            **settings,
        )
    except ReferenceMismatch as err:  # only this; any other ValueError in generation is not about --baseline
        raise UserError(f"{err}; --baseline must be the original of --model (same tokenizer)") from err
    return report


def _progress(console, label: str):
    """Progress of one model's evaluation, drawn by the same reporter and console as ``run``."""

    report = Reporter(console)
    return lambda done, total, what: report.progress(done, total, f"{label}: {what}")


def _report_json(args: argparse.Namespace, baseline_report, report) -> dict:
    data = {
        "model": args.model,
        "baseline": args.baseline,
        "settings": {
            "num_prompts": args.num_prompts,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "kl_tokens": args.kl_tokens,
            "batch_size": args.batch_size,
            "capability_questions": args.capability_questions,
            "judge": args.judge,
            "system_prompt": args.system_prompt,
            "harmful_dataset": args.harmful_dataset,
            "harmless_dataset": args.harmless_dataset,
        },
        "report": report.to_dict(),
        "baseline_report": baseline_report.to_dict() if baseline_report is not None else None,
    }

    return data


def _write_reports(args: argparse.Namespace, baseline_report, report) -> None:
    """--output and --responses land together: each is written and flushed (a full disk fails now, naming
    its file) to a temporary file, and both are renamed only when both are complete."""
    with contextlib.ExitStack() as stack:
        if args.output:
            ensure_parent(args.output)
            out = stack.enter_context(atomic_open(args.output, "w"))
            out.write(json.dumps(_report_json(args, baseline_report, report), indent=2) + "\n")
            out.flush()
        if args.responses:
            ensure_parent(args.responses)
            out = stack.enter_context(atomic_open(args.responses, "w"))
            for label, r in (("baseline", baseline_report), ("model", report)):
                for response in r.responses if r is not None else []:
                    out.write(json.dumps({"model": label, **response}, ensure_ascii=False) + "\n")
            out.flush()
