"""Run the real CLI in a subprocess (optionally with a fault injected at save time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_INJECT = """
import sys, errno
import mlx_abliteration
from mlx_abliteration.export import save as export_save
from mlx_abliteration.io import model_io
calls = {{"n": 0}}
real = export_save.write_shard
def faulty(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] >= {after}:
        {raise_stmt}
    return real(*args, **kwargs)
export_save.write_shard = faulty
from mlx_abliteration.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

FAULTS = {
    "disk-full": "raise OSError(errno.ENOSPC, 'No space left on device')",
    "interrupt": "raise KeyboardInterrupt",
    "bug": "raise RuntimeError('bug')",
}


def run_cli(
    *args: str,
    fault: str | None = None,
    after: int = 2,
    env: dict | None = None,
    timeout: int = 300,
    stdin: str | None = None,
):
    """``python -m mlx_abliteration ARGS``; ``fault`` makes the n-th shard write fail."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull, **(env or {})}
    if fault:
        code = _INJECT.format(after=after, raise_stmt=FAULTS[fault])
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "mlx_abliteration", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout, input=stdin)


def assert_one_line_error(proc, *needles: str) -> str:
    """The contract for a user mistake: exit 2, one ``error:`` line (the last) holding each needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and sum(line.startswith("error") for line in lines) == 1, proc.stderr
    assert not [line for line in lines if line.startswith("  ")], proc.stderr  # no continuation lines
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]
