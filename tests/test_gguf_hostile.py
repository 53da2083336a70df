"""Hostile GGUF headers (counts and lengths far beyond the file) are refused quickly, in bounded memory.

The files are written byte by byte here (struct), as an attacker would: gguf-py's reader trusts
every count and would loop and allocate without bound on them.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc

import gguf  # noqa: F401  (imported before timing, as open_gguf has it imported before the check)
import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_header import check_gguf_header

from .cli_helpers import REPO

HUGE = 1 << 62
U8, U32, STRING, ARRAY, F32_TENSOR = 0, 4, 8, 9, 0


def string(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


def header(tensors: int, kvs: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


def kv(key: bytes, vtype: int, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + value


def tensor_info(name: bytes, dims: list[int], offset: int = 0, ttype: int = F32_TENSOR) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


ARCH = kv(b"general.architecture", STRING, string(b"llama"))


def with_data(head: bytes, data_bytes: int) -> bytes:
    return head + b"\0" * (-len(head) % 32) + b"\0" * data_bytes


HOSTILE = {
    # the 132-byte file: an array of 2**62 one-byte values
    "huge-u8-array": (header(0, 1) + kv(b"tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", U8, HUGE))).ljust(
        132, b"\0"
    ),
    "huge-u32-array": header(0, 1) + kv(b"x", ARRAY, struct.pack("<IQ", U32, HUGE)) + b"\0" * 64,
    "huge-string-array": header(0, 1)
    + kv(b"tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, HUGE))
    + b"\0" * 64,
    "huge-string-length": header(0, 1) + kv(b"general.name", STRING, string(b"abc", HUGE)) + b"\0" * 64,
    "huge-key-length": header(0, 1) + string(b"k", HUGE) + b"\0" * 64,
    "huge-kv-count": header(0, HUGE) + ARCH,
    "huge-tensor-count": header(HUGE, 1) + ARCH + b"\0" * 64,
    "huge-tensor-name": header(1, 1) + ARCH + string(b"t", HUGE) + b"\0" * 64,
    "too-many-dims": header(1, 1) + ARCH + string(b"t") + struct.pack("<I", 1 << 31) + b"\0" * 64,
    "huge-dims": with_data(header(1, 1) + ARCH + tensor_info(b"t", [HUGE, HUGE, HUGE, HUGE]), 64),
    "data-past-the-end": with_data(header(1, 1) + ARCH + tensor_info(b"t", [16, 16]), 16 * 16 * 4 - 1),
    "offset-past-the-end": with_data(header(1, 1) + ARCH + tensor_info(b"t", [4], offset=HUGE), 64),
    "deep-nested-arrays": header(0, 1) + kv(b"x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 10_000) + b"\0" * 64,
    "unknown-value-type": header(0, 1) + kv(b"x", 77, b"\0" * 8),
    "bad-alignment": header(0, 1) + kv(b"general.alignment", U32, struct.pack("<I", 3)),
    "truncated-header": header(0, 1)[:-3],
}


# Runs the command and prints its peak resident memory (KiB on Linux, bytes on macOS) to the file
# MEASURE_TO. A small parent of its own: on Linux a child's ru_maxrss starts at its parent's
# resident size at the fork, and the test process's may be gigabytes.
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
with open(os.environ["MEASURE_TO"], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*args: str, tmp_path) -> tuple[subprocess.CompletedProcess, float, float]:
    """The CLI in a subprocess: (result, seconds, its own peak resident memory in MB)."""
    report = tmp_path.parent / f"{tmp_path.name}.maxrss"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull, "MEASURE_TO": str(report)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "mlx_abliteration", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # an unbounded loop fails the test instead of hanging it
    )
    seconds = time.perf_counter() - start
    peak = int(report.read_text())
    report.unlink()
    return result, seconds, peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_refused_in_bounded_time_and_memory(tmp_path, case):
    path = tmp_path / "model.gguf"
    path.write_bytes(HOSTILE[case])
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(UserError) as refused:
        check_gguf_header(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1 and peak < 1 << 20, (seconds, peak)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("case", ["huge-u8-array", "huge-string-length", "huge-tensor-count", "data-past-the-end"])
def test_import_gguf_refuses_a_hostile_file_with_one_line(tmp_path, case):
    path = tmp_path / "model.gguf"
    path.write_bytes(HOSTILE[case])
    result, seconds, peak_mb = run_measured("import-gguf", str(path), "-o", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: cannot read GGUF file {path} (") and result.stderr.count("\n") == 1
    # the whole CLI (interpreter start and imports included) stays small and quick
    assert peak_mb < 100 and seconds < 30, (peak_mb, seconds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_run_refuses_a_hostile_gguf_model(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(HOSTILE["huge-u8-array"])
    result, _, peak_mb = run_measured(
        "run", "-m", str(path), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), tmp_path=tmp_path
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read GGUF file {path} ("), result.stderr
    assert peak_mb < 100, peak_mb
    assert not (tmp_path / "out").exists()


def test_the_limits_leave_real_vocabularies_alone(tmp_path):
    """A 256k-token vocabulary with scores and types, as large as real models carry, passes."""
    tokens = [f"tok{i}".encode() for i in range(256_000)]
    body = kv(b"tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, len(tokens)) + b"".join(map(string, tokens)))
    body += kv(b"tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, len(tokens)) + b"\0" * 4 * len(tokens))
    path = tmp_path / "model.gguf"
    path.write_bytes(with_data(header(1, 3) + ARCH + body + tensor_info(b"t", [16, 16]), 16 * 16 * 4))
    start = time.perf_counter()
    check_gguf_header(path)
    assert time.perf_counter() - start < 5
