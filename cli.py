"""Seed entry point: ``python cli.py -m MODEL -o OUTDIR [flags]`` runs the full pipeline."""

import sys

from mlx_abliteration.cli.main import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    raise SystemExit(main(["run", *argv]))
