"""Print (or --write into README.md) the supported-architecture table, generated from tests/arch_proof.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="replace the table between the markers in README.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.arch_proof import support_table

    table = support_table()
    if not args.write:
        print(table)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
