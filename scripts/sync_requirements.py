"""Write requirements.txt and environment.yml from pyproject.toml (the one source).

python scripts/sync_requirements.py          # rewrite both files
python scripts/sync_requirements.py --check  # exit 1 if they drifted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from pyproject.toml by scripts/sync_requirements.py; do not edit.\n"


def dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def requirements_txt() -> str:
    return HEADER + "\n".join(dependencies()) + "\n"


def environment_yml() -> str:
    pip_lines = "".join(f'      - "{dep}"\n' for dep in dependencies())
    return (
        HEADER
        + "name: abliteration-env\n"
        + "channels:\n  - conda-forge\n"
        + "dependencies:\n  - python=3.11\n  - pip\n  - pip:\n"
        + pip_lines
        + '      - "-e ."\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files differ from pyproject.toml")
    args = parser.parse_args()
    wanted = {"requirements.txt": requirements_txt(), "environment.yml": environment_yml()}
    drifted = [name for name, text in wanted.items() if not (ROOT / name).exists() or (ROOT / name).read_text() != text]
    if args.check:
        for name in drifted:
            print(f"{name} is out of date; run python scripts/sync_requirements.py", file=sys.stderr)
        return 1 if drifted else 0
    for name, text in wanted.items():
        (ROOT / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
