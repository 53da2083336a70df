"""README.md stays a short user's manual whose flags and links are real.

(a) at most 250 lines; (b) every ``--flag`` it names is in the ``--help`` of
some ``mlx-abliterate`` subcommand, asked through ``python -m mlx_abliteration``
in subprocesses; (c) every relative link points to an existing file and, for a
Markdown target, to one of its headings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 250
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_abliteration", *command, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mlx-abliterate {' '.join(command)} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def _subcommands(main_help: str) -> list[str]:
    """Subcommand names from the top-level help's COMMAND list."""
    section = main_help.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^ {4}([a-z][a-z0-9-]*)\b", section, flags=re.MULTILINE)


@cache
def cli_flags() -> dict[str, set[str]]:
    """Every long flag each subcommand's --help shows ("" = the top-level command)."""
    main_help = _help()
    commands = _subcommands(main_help)
    assert "run" in commands and "gui" in commands, commands
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = dict(zip(commands, pool.map(_help, commands)))
    helps[""] = main_help
    return {command: set(FLAG.findall(text)) for command, text in helps.items()}


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it at most {MAX_LINES} (details go to docs/)"


def test_readme_flags_exist_in_the_cli():
    flags = cli_flags()
    known = set().union(*flags.values())
    written = set(FLAG.findall(README.read_text()))
    assert written, "no --flag found in README.md"
    missing = sorted(written - known)
    assert not missing, f"README.md names flags no mlx-abliterate subcommand has: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6}\s+(.*)", line)):
            slug, n = _slug(match.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(markdown: Path) -> list[str]:
    links = LINK.findall(markdown.read_text())
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize("link", _relative_links(README))
def test_readme_links_point_to_files(link):
    path, _, anchor = link.partition("#")
    target = (README.parent / path) if path else README
    assert target.exists(), f"README.md links to {link}, but {target.relative_to(ROOT)} does not exist"
    if anchor and target.suffix == ".md":
        assert anchor in _anchors(target), f"README.md links to {link}: no such heading in {path or 'README.md'}"


def test_module_paths_in_the_docs_exist():
    """Every ``mlx_abliteration.a.b.Name`` the README and docs/ name resolves to a module or an attribute."""
    import importlib

    texts = [README.read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    paths = sorted({p for text in texts for p in re.findall(r"mlx_abliteration(?:\.[A-Za-z_]+)+", text)})
    assert paths, "no module path found in README.md or docs/"
    missing = []
    for path in paths:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[cut:]:
            obj = getattr(obj, name, None)
        if obj is None:
            missing.append(path)
    assert not missing, f"README.md/docs name paths that do not exist: {missing}"
