"""Print (or --write) the supported-architecture table, generated from tests/arch_proof.py.

--write puts the table between the markers in docs/architectures.md and its
summary line (the table's first line) between the markers in README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE_FILE = ROOT / "docs" / "architectures.md"
SUMMARY_FILE = ROOT / "README.md"
TABLE_MARKERS = ("<!-- support-table:start -->", "<!-- support-table:end -->")
SUMMARY_MARKERS = ("<!-- support-summary:start -->", "<!-- support-summary:end -->")


def summary_line(table: str) -> str:
    """The table's first line: mlx-lm version and the counts."""
    return table.split("\n", 1)[0]


def replace_between(path: Path, markers: tuple[str, str], body: str) -> None:
    start, end = markers
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: markers {start} ... {end} not found")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--write",
        action="store_true",
        help="replace the table in docs/architectures.md and the summary line in README.md",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.arch_proof import support_table

    table = support_table()
    if not args.write:
        print(table)
        return 0
    replace_between(TABLE_FILE, TABLE_MARKERS, table)
    replace_between(SUMMARY_FILE, SUMMARY_MARKERS, summary_line(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
