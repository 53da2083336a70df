"""Seed-compatible entry point: ``python generate_dataset.py --template-file templates.yaml --num-samples 100``."""

import sys

from mlx_abliteration.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["generate-dataset", *sys.argv[1:]]))
