"""``mlx-abliterate upload OUT --repo USER/NAME``: publish a saved model (or adapter) with its model card."""

from __future__ import annotations

import argparse

from mlx_abliteration.export.hub_upload import upload

HELP = "upload a saved abliterated model or adapter folder to the Hugging Face Hub"
DESCRIPTION = (
    "Create the Hub repo and upload the folder written by run/ablate/search/export-adapter: weights, "
    "config, tokenizer, abliteration_log.json and the model card README.md (written from the log if "
    "missing). The token comes from HF_TOKEN or `huggingface-cli login`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="output dir of mlx-abliterate run/ablate/search/export-adapter")
    add_upload_flags(parser, repo_flag="--repo", overwrite_flag="--overwrite", required=True)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the files and the model card that would be uploaded; no token or network needed",
    )


def add_upload_flags(
    parser: argparse.ArgumentParser, repo_flag: str, overwrite_flag: str = "--overwrite-repo", required: bool = False
) -> None:
    parser.add_argument(
        repo_flag,
        dest="upload_repo",
        required=required,
        metavar="USER/NAME",
        help="Hugging Face model repo to create and upload to",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    parser.add_argument(
        overwrite_flag,
        dest="overwrite_repo",
        action="store_true",
        help="upload into a repo that already exists (same-named files are replaced)",
    )


def upload_folder(folder, args: argparse.Namespace, dry_run: bool = False) -> int:
    plan = upload(folder, args.upload_repo, private=args.private, overwrite=args.overwrite_repo, dry_run=dry_run)
    if dry_run:
        print(plan.describe())
    else:
        print(
            f"uploaded {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB) to https://huggingface.co/{plan.repo}"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    return upload_folder(args.folder, args, dry_run=args.dry_run)
