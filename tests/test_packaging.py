"""Packaging: entry points, fast --help, requirement files in sync with pyproject."""

import subprocess
import sys

from .cli_helpers import REPO, run_cli


def test_requirement_files_match_pyproject():
    proc = subprocess.run(
        [sys.executable, "scripts/sync_requirements.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_version_and_help_do_not_import_mlx_lm():
    # mlx-lm imports transformers (~1.7 s); --help and one-line errors must not pay for it.
    code = (
        "import sys; from mlx_abliteration.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'gradio', 'optuna', 'huggingface_hub') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    proc = run_cli("--version")
    assert proc.returncode == 0 and "mlx-abliterate" in proc.stdout


def test_every_subcommand_exists_and_documents_every_flag():
    import argparse

    from mlx_abliteration.cli.main import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings} has no help text"
        text = command.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert text.count("(default:") >= 1, name
    proc = run_cli("run", "--help")
    assert proc.returncode == 0 and "usage: mlx-abliterate run" in proc.stdout


def test_console_script_installed():
    exe = REPO / ".venv" / "bin" / "mlx-abliterate"
    if exe.exists():
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
        assert proc.returncode == 0
