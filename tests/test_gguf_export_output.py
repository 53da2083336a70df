"""export-gguf and import-gguf follow run's output rules (issue 26), through the CLI.

Never the source or inside it, an existing file only with --overwrite and never one another
process created meanwhile, and a killed export's temporary file is swept by the next one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from mlx_abliteration.io.output_dir import _HOST, _TEMP_NAME

from .cli_helpers import REPO, run_cli
from .test_gguf import vocab, write_gguf  # noqa: F401  (vocab is a fixture)

# export-gguf with HOOK run once, when the tensor data starts being written (the temp file exists)
_HOOKED = """
import os, sys, signal, pathlib
from mlx_abliteration.export import gguf_export
real = gguf_export._write_tensors
def hooked(*args, **kwargs):
{hook}
    return real(*args, **kwargs)
gguf_export._write_tensors = hooked
from mlx_abliteration.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_hooked(hook: str, *args: str) -> subprocess.CompletedProcess:
    code = _HOOKED.format(hook="\n".join("    " + line for line in hook.strip().splitlines()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()  # a progress bar may come first
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error") for line in lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[-1], proc.stderr


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_model, tmp_path):
    """A private copy of the tiny model: a test that fails to refuse cannot damage the shared one."""
    return shutil.copytree(tiny_model(), tmp_path / "model")


@pytest.mark.parametrize(
    "target,flags",
    [
        ("model.safetensors", ["--overwrite"]),  # the model's only weight file
        ("config.json", ["--overwrite"]),
        ("m.gguf", []),  # a new file inside the model folder
        ("sub/m.gguf", []),
    ],
)
def test_export_gguf_never_writes_into_the_source_model(model, target, flags):
    before = snapshot(model)
    proc = run_cli("export-gguf", str(model), "-o", str(model / target), *flags)
    assert_one_line_error(proc, "is inside the source")
    assert snapshot(model) == before and not (model / "sub").exists()


def test_export_gguf_source_named_through_a_symlink_is_still_refused(model, tmp_path):
    (tmp_path / "link").symlink_to(model)
    before = snapshot(model)
    proc = run_cli("export-gguf", str(tmp_path / "link"), "-o", str(model / "model.safetensors"), "--overwrite")
    assert_one_line_error(proc, "is inside the source")
    assert snapshot(model) == before


def test_export_gguf_never_replaces_a_file_created_meanwhile(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run_hooked(
        f"pathlib.Path({str(out)!r}).write_text('another process')", "export-gguf", str(tiny_model()), "-o", str(out)
    )
    assert_one_line_error(proc, "created by another process")
    assert out.read_text() == "another process" and os.listdir(tmp_path) == ["m.gguf"]


def test_killed_export_leaves_only_a_temp_file_the_next_export_sweeps(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run_hooked("os.kill(os.getpid(), signal.SIGKILL)", "export-gguf", str(tiny_model()), "-o", str(out))
    assert proc.returncode == -9
    (left,) = os.listdir(tmp_path)
    match = _TEMP_NAME.match(left)
    assert match and match["name"] == "m.gguf" and match["host"] == _HOST and match["kind"] == "partial", left
    proc = run_cli("export-gguf", str(tiny_model()), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_sigterm_during_export_removes_the_temp_file(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run_hooked("os.kill(os.getpid(), signal.SIGTERM)", "export-gguf", str(tiny_model()), "-o", str(out))
    assert proc.returncode == 143, proc.stderr
    assert os.listdir(tmp_path) == []


def test_import_gguf_never_replaces_or_holds_the_gguf(tmp_path, vocab):  # noqa: F811
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path, vocab, "llama")
    before = gguf_path.read_bytes()
    for out, text in ((gguf_path, "is the source"), (tmp_path, "contains the source")):
        proc = run_cli("import-gguf", str(gguf_path), "-o", str(out), "--overwrite")
        assert_one_line_error(proc, text)
        assert gguf_path.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]
    proc = run_cli("import-gguf", str(gguf_path), "-o", str(tmp_path / "out"))  # beside the GGUF: fine
    assert proc.returncode == 0, proc.stderr
    assert gguf_path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.gguf", "out"]


def test_every_temp_file_has_the_one_swept_name(tmp_path):
    """atomic_path's temporaries are named like make_temp_dir's, and a dead writer's are swept by the next write."""
    from mlx_abliteration.io.atomic_write import atomic_path, write_text

    with atomic_path(tmp_path / "d.safetensors", suffix=".safetensors") as tmp:
        assert _TEMP_NAME.match(tmp.name) and tmp.name.endswith(".safetensors")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".report.json.partial.{_HOST}.{child.pid}.abcdef"
    stale.write_text("half")
    write_text(tmp_path / "other.json", "{}")
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors", "other.json"]


def test_no_other_temp_naming_in_the_package():
    """Every temporary file or dir is made by output_dir.temp_name (so sweep_stale knows it)."""
    package = REPO / "mlx_abliteration"
    pattern = re.compile(r"mkstemp|mkdtemp|NamedTemporaryFile|TemporaryDirectory|\.tmp\b|tmp-|\.partial\b(?!\()")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in package.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line.split("#")[0]) and path.name != "output_dir.py"
    ]
    assert offenders == []
