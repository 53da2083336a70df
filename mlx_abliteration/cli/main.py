"""``mlx-abliterate``: one subcommand per module in ``mlx_abliteration.cli``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int``. Modules import MLX lazily so ``--help`` stays fast.

Errors: a :class:`UserError` (something the user can fix) is one line, exit 2.
Anything else is a failure of the tool (or of MLX: out of memory...): one line
with its type and where it was raised, exit 1, and its full traceback in the
JSON log. ``--debug`` (before or after the command) prints the traceback of
either kind, including the low-level error behind a UserError.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

from mlx_abliteration import __version__
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.io.output_dir import Terminated, handle_sigterm
from mlx_abliteration.pipeline.events import FollowerRankDone
from mlx_abliteration.runtime.backend import keep_torch_out, persistent_kernel_cache
from mlx_abliteration.runtime.logging_config import LOGGER_NAME, setup_logging

COMMANDS = {
    "run": "run",
    "probe": "probe",
    "ablate": "ablate",
    "eval": "evaluate",
    "search": "search",
    "chat": "chat",
    "generate-dataset": "generate_dataset",
    "import-gguf": "import_gguf",
    "export-gguf": "export_gguf",
    "upload": "upload",
    "export-adapter": "export_adapter",
    "gui": "gui",
}


def _load_command(module_name: str):
    try:
        return importlib.import_module(f"mlx_abliteration.cli.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"mlx_abliteration.cli.{module_name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-abliterate",
        description="Remove refusal behaviour from chat LLMs by abliteration on MLX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
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
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, print the full traceback"
        )
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
    """Run a parsed command; user mistakes become one-line errors, anything else says where it came from."""
    debug = bool(getattr(args, "debug", False))
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        code = int(module.main(args) or 0)
        sys.stdout.flush()  # a full disk under `> file` fails here, not in Python's exit (exit 120)
        return code
    except FollowerRankDone as done:  # under mlx.launch, ranks other than 0 stop after the merged probe
        print(done, file=sys.stderr)
        return 0
    except (UserError, FileNotFoundError) as err:
        if debug:
            _print_traceback(err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            print("terminated (SIGTERM): stopped and cleaned up; nothing was written", file=sys.stderr)
            return 143
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's doing: keep the type, say where, log the traceback
        log_path = _log_exception(err, args)
        if debug:
            _print_traceback(err)
        print(f"error: {type(err).__name__}: {' '.join(str(err).split()) or '(no message)'}", file=sys.stderr)
        where = f" (raised at {origin(err)})" if origin(err) else ""
        logged = f"; traceback in {log_path}" if log_path else ""
        hint = "" if debug else "; rerun with --debug to print it"
        print(f"  an internal error, not a problem with your input{where}{logged}{hint}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout


class _GuardedStdout:
    """Standard output whose failed writes the user can fix (``> file`` on a full disk, over quota) are a
    one-line ``UserError``; standard output then goes to the null device, so Python's own flush at exit
    does not fail again with a traceback (and exit 120)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            raise self._failed(err) from err

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            raise self._failed(err) from err

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _failed(self, err: OSError) -> BaseException:
        closed = err.errno == errno.EPIPE  # `| head` stopped reading
        if not closed and not is_user_write_failure(err):
            return err
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file behind it (a test's capture)
            pass
        if closed:
            return UserError("standard output was closed (broken pipe); the rest of this command's output was dropped")
        return UserError(str(write_error("standard output", err)).split(" — ")[0])  # not "nothing was written"


def origin(err: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame that raised ``err``."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _print_traceback(err: BaseException) -> None:
    """The full traceback, with the low-level error a UserError was raised from (even ``from None``)."""
    if isinstance(err, UserError) and err.__cause__ is None and err.__context__ is not None:
        err.__suppress_context__ = False
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)


def _log_exception(err: BaseException, args: argparse.Namespace) -> str | None:
    """Write ``err`` with its traceback to the JSON log (set up now if the command had not); its path."""

    logger = logging.getLogger(LOGGER_NAME)
    try:
        if not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
            setup_logging(getattr(args, "log_file", None))
        handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        if not handlers:  # no writable log location (never let logging's last resort print it)
            return None
        logger.error("%s failed: %s: %s", getattr(args, "command", "command"), type(err).__name__, err, exc_info=err)
    except Exception:  # the log is a help, never a second failure
        return None
    path = handlers[0].baseFilename
    return None if path == os.devnull or getattr(handlers[0], "failed", False) else path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_command"):
        parser.print_help()
        return 1

    keep_torch_out()
    persistent_kernel_cache(getattr(args, "cache_dir", None))  # before MLX compiles its first CUDA kernel
    handle_sigterm()  # a plain `kill` cleans up like Ctrl-C
    return run_command(args._command, args)


if __name__ == "__main__":
    raise SystemExit(main())
