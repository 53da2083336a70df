"""``mlx-abliterate gui``: the Gradio web UI (the seed's ``python gui.py``)."""

from __future__ import annotations

import argparse

HELP = "web UI: run the pipeline with live progress, plots and a side-by-side model comparison"
DESCRIPTION = (
    "Serve a Gradio app that runs the same pipeline as `mlx-abliterate run` from a form, streams its "
    "progress, shows the before/after metrics and a per-layer plot of the refusal direction, and "
    "compares the original and the abliterated model on one prompt. Local only unless --share."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to your network)")
    parser.add_argument("--port", type=int, default=None, help="port; when not given, 7860 or the next free one")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link")
    parser.add_argument("--log-file", help="JSON-lines log file; when not given, $MLX_ABLITERATION_LOG_FILE or ~/.mlx-llm/abliteration-toolkit-cli/log.jsonl")


def main(args: argparse.Namespace) -> int:
    from ..core.logging_config import setup_logging
    from ..errors import UserError

    try:
        from ..gui import launch
    except ModuleNotFoundError as err:
        if err.name not in ("gradio", "matplotlib", "pandas"):
            raise
        raise UserError(f"the GUI needs {err.name}; install it with: pip install 'mlx-abliteration[gui]'") from None
    setup_logging(args.log_file)
    app = launch(args.host, args.port, args.share, prevent_thread_lock=True, quiet=True)
    print(f"MLX Abliteration GUI on {app.local_url}  (Ctrl-C stops it)", flush=True)
    if args.share:
        print(f"public link: {app.share_url}", flush=True)
    app.block_thread()
    return 0
