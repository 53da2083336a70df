"""Seed entry point: ``python gui.py [--host H] [--port N] [--share]`` serves the web UI.

Only a launcher: the app lives in the ``mlx_abliteration.gui`` package
(same as ``mlx-abliterate gui``).
"""

import sys

from mlx_abliteration.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["gui", *sys.argv[1:]]))
