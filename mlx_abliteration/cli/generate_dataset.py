"""``mlx-abliterate generate-dataset``: paired harmful/harmless prompt sets from a YAML template file."""

from __future__ import annotations

import argparse

from mlx_abliteration.data.generator import generate_datasets

HELP = "Generate harmful/harmless prompt datasets (JSONL) from a YAML template file."
DESCRIPTION = (
    "Fill the templates of a YAML file with each concept's harmful and harmless values and write "
    "harmful_dataset.jsonl and harmless_dataset.jsonl with provenance fields. Deterministic for a "
    "given --seed; no duplicate prompts. Options left out come from the file's generation_config."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--template-file",
        default=None,
        help="YAML file with templates and concepts (default: the packaged templates.yaml)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="prompts per kind (default: from the file, else 100)"
    )
    parser.add_argument("--output-dir", default=None, help="directory for the two JSONL files (default: from the file)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the file, else 0)")
    parser.add_argument(
        "--probe-marker",
        default=None,
        help="marker text (e.g. '</think>') filled into {marker} placeholders and, with --append-marker, appended",
    )
    parser.add_argument(
        "--append-marker",
        action="store_true",
        help="append the --probe-marker text to every prompt, after one space",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing dataset files in --output-dir")


def main(args: argparse.Namespace) -> int:
    result = generate_datasets(
        template_file=args.template_file,
        output_dir=args.output_dir,
        num_samples=args.num_samples,
        seed=args.seed,
        probe_marker=args.probe_marker,
        append_marker=args.append_marker,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {result.num_samples} harmful and {result.num_samples} harmless prompts "
        f"({result.concepts} concepts, {result.templates} templates, seed {result.seed}):"
    )
    for path in result.paths.values():
        print(f"  {path}")
    return 0
