"""``mlx-abliterate``: one subcommand per module in ``mlx_abliteration.commands``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int``. Modules import MLX lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

COMMANDS = {
    "run": "run",
    "probe": "probe",
    "ablate": "ablate",
    "eval": "evaluate",
    "search": "search",
    "chat": "chat",
    "generate-dataset": "generate_dataset",
    "import-gguf": "import_gguf",
    "gui": "gui",
}


def _load_command(module_name: str):
    try:
        return importlib.import_module(f"mlx_abliteration.commands.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"mlx_abliteration.commands.{module_name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-abliterate",
        description="Remove refusal behaviour from chat LLMs by abliteration on MLX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = _load_command(module_name)
        if module is None:
            continue
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_command=module)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say it and X means something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def run_command(module, args: argparse.Namespace) -> int:
    """Run a parsed command; user mistakes become one-line errors."""
    try:
        return int(module.main(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from .core.output_dir import Terminated

        if isinstance(err, Terminated):
            print("terminated (SIGTERM): stopped and cleaned up; nothing was written", file=sys.stderr)
            return 143
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_command"):
        parser.print_help()
        return 1
    from .core.output_dir import handle_sigterm

    handle_sigterm()  # a plain `kill` cleans up like Ctrl-C
    return run_command(args._command, args)


if __name__ == "__main__":
    raise SystemExit(main())
