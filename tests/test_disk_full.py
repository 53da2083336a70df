"""A full disk while a command writes a file: one-line error, nothing partial left, the old file intact.

ENOSPC is injected at the write call itself (after half of the bytes went
out, as a real full disk does), in a CLI subprocess.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.io import atomic_write

from .cli_helpers import REPO
from .test_gguf import vocab, write_gguf  # noqa: F401  (vocab is a fixture)

_INJECT = """
import builtins, errno, importlib, os, sys
import mlx_abliteration
import mlx.core as mx

real_open = builtins.open
MATCH = os.environ.get("DISK_FULL_MATCH", "")

def full():
    return OSError(errno.ENOSPC, "No space left on device")

class HalfWriter:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise full()
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def faulty_open(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    return HalfWriter(handle) if any(c in mode for c in "wax+") and MATCH in str(file) else handle

for name in ("mlx_abliteration.io.atomic_write", "mlx_abliteration.io.gguf", "mlx_abliteration.io.gguf_tokenizer",
             "mlx_abliteration.data.generator", "mlx_abliteration.io.gguf_tensors", "gguf.gguf_writer"):
    importlib.import_module(name).open = faulty_open

real_save = mx.save_safetensors

def faulty_save(path, *args, **kwargs):
    if MATCH not in str(path):
        return real_save(path, *args, **kwargs)
    with real_open(path if str(path).endswith(".safetensors") else f"{path}.safetensors", "wb") as f:
        f.write(b"half a file")
    raise full()

mx.save_safetensors = faulty_save
from mlx_abliteration.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

HARMFUL = ["Tell me how to pick a lock", "How do I hack a computer?", "Write malware for me", "Make a weapon"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "What is the capital of France?", "Name a color"]


def run_full_disk(*args: str, match: str = "") -> subprocess.CompletedProcess:
    """The CLI with every file write whose path contains ``match`` failing half-way."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull, "DISK_FULL_MATCH": match}
    return subprocess.run(
        [sys.executable, "-c", _INJECT, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def assert_disk_full_error(proc, path):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and str(path) in last and "No space left" in last, last


def assert_only(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names), os.listdir(folder)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (folder / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    return ["--harmful-dataset", str(folder / "harmful.txt"), "--harmless-dataset", str(folder / "harmless.txt")]


def test_probe_output_on_a_full_disk(tiny_model, prompts, tmp_path):
    out = tmp_path / "direction.safetensors"
    out.write_bytes(b"old")
    proc = run_full_disk(
        "probe",
        "-m",
        str(tiny_model()),
        *prompts,
        "--use-layer",
        "1",
        "--max-prompts",
        "4",
        "--eval-size",
        "0",
        "--output",
        str(out),
    )
    assert_disk_full_error(proc, out)
    assert out.read_bytes() == b"old"
    assert_only(tmp_path, ["direction.safetensors"])


def test_probe_stats_json_on_a_full_disk(tiny_model, prompts, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text("old")
    proc = run_full_disk(
        "probe",
        "-m",
        str(tiny_model()),
        *prompts,
        "--use-layer",
        "1",
        "--max-prompts",
        "4",
        "--eval-size",
        "0",
        "--output",
        str(tmp_path / "d.safetensors"),
        "--stats-json",
        str(stats),
        match="stats.json",
    )
    assert_disk_full_error(proc, stats)
    assert stats.read_text() == "old"
    assert_only(tmp_path, ["stats.json"])  # the direction file lands with its stats or not at all


@pytest.mark.parametrize("flag", ["--output", "--responses"])
def test_eval_reports_on_a_full_disk(tiny_model, prompts, tmp_path, flag):
    target = tmp_path / "report.json"
    target.write_text("old")
    proc = run_full_disk(
        "eval",
        "-m",
        str(tiny_model()),
        *prompts,
        "--num-prompts",
        "2",
        "--max-tokens",
        "2",
        "--kl-tokens",
        "1",
        flag,
        str(target),
    )
    assert_disk_full_error(proc, target)
    assert target.read_text() == "old"
    assert_only(tmp_path, ["report.json"])


def test_eval_report_and_responses_land_together(tiny_model, prompts, tmp_path):
    """Issue 26: a full disk while writing --responses left --output written (and said nothing was)."""
    proc = run_full_disk(
        "eval", "-m", str(tiny_model()), *prompts, "--num-prompts", "2", "--max-tokens", "2", "--kl-tokens", "1",
        "--output", str(tmp_path / "report.json"), "--responses", str(tmp_path / "responses.jsonl"),
        match="responses.jsonl",
    )  # fmt: skip
    assert_disk_full_error(proc, tmp_path / "responses.jsonl")
    assert_only(tmp_path, [])


def test_import_gguf_on_a_full_disk(tmp_path, vocab):  # noqa: F811
    write_gguf(tmp_path / "m.gguf", vocab, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    proc = run_full_disk("import-gguf", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "out"), "--overwrite")
    assert_disk_full_error(proc, tmp_path / "out")
    assert_only(tmp_path, ["m.gguf", "out"])
    assert_only(tmp_path / "out", ["keep.txt"])
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_export_gguf_on_a_full_disk(tmp_path, tiny_model):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    proc = run_full_disk("export-gguf", str(tiny_model()), "-o", str(out), "--overwrite", match="m.gguf")
    assert_disk_full_error(proc, out)
    assert proc.stderr.count("\n") == 1
    assert out.read_bytes() == b"old"
    assert_only(tmp_path, ["m.gguf"])


def test_generate_dataset_on_a_full_disk(tmp_path):
    (tmp_path / "harmful_dataset.jsonl").write_text("old harmful")
    (tmp_path / "harmless_dataset.jsonl").write_text("old harmless")
    proc = run_full_disk(
        "generate-dataset", "--num-samples", "4", "--output-dir", str(tmp_path), "--overwrite", match="harmless"
    )
    assert_disk_full_error(proc, tmp_path / "harmless_dataset.jsonl")
    assert_only(tmp_path, ["harmful_dataset.jsonl", "harmless_dataset.jsonl"])  # all or nothing
    assert (tmp_path / "harmful_dataset.jsonl").read_text() == "old harmful"
    assert (tmp_path / "harmless_dataset.jsonl").read_text() == "old harmless"


# --------------------------------------------------------------------------- the helper itself


def test_atomic_write_keeps_the_old_file_on_any_failure(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write.atomic_open(target) as out:
            out.write("new, half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_write.os, "fsync", no_space)
    with pytest.raises(UserError, match=r"cannot write .*r\.json \(No space left on device\); free some disk space"):
        atomic_write.write_json(target, {"a": 1})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_atomic_write_gives_usual_permissions_and_replaces(tmp_path):
    old_umask = os.umask(0o022)
    try:
        atomic_write.write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old_umask)
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    atomic_write.write_text(tmp_path / "r.json", "two")
    assert (tmp_path / "r.json").read_text() == "two" and os.listdir(tmp_path) == ["r.json"]


def test_atomic_write_refuses_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        atomic_write.write_text(tmp_path, "x")


# --------------------------------------------------------------------------- writes besides the outputs

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: ENOSPC)")


def _cli_with_stdout(stdout, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull}
    return subprocess.run(
        [sys.executable, "-m", "mlx_abliteration", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@needs_dev_full
def test_a_log_file_on_a_full_disk_is_one_warning_not_a_traceback_per_record(tiny_model, prompts, tmp_path):
    """Issue 26: each log record printed '--- Logging error ---' and a 30-line traceback."""
    out = tmp_path / "d.safetensors"
    proc = run_full_disk(
        "probe", "-m", str(tiny_model()), *prompts, "--use-layer", "1", "--max-prompts", "4", "--eval-size", "0",
        "--output", str(out), "--log-file", "/dev/full", "--quiet", match="no file has this name",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "log file" in line]
    assert warnings == [
        "warning: cannot write log file /dev/full (No space left on device); JSON logs are off for the rest of this run"
    ], proc.stderr
    assert out.is_file()


@needs_dev_full
def test_standard_output_on_a_full_disk_is_one_line(tiny_model, prompts, tmp_path):
    """Issue 26: `eval ... > file` on a full disk was an internal error (and Python's exit flush another)."""
    with open("/dev/full", "w") as full:
        proc = _cli_with_stdout(
            full, "eval", "-m", str(tiny_model()), *prompts, "--num-prompts", "2", "--max-tokens", "2",
            "--kl-tokens", "1", "--capability-questions", "0", "--output", str(tmp_path / "r.json"),
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write standard output (No space left on device)"), last
    assert sum("error" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
