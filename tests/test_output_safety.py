"""Outputs never destroy what the user did not name, and success means this process's result landed.

Each test reproduces a failure case of issue 13 through the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .cli_helpers import REPO, run_cli

PROMPTS = [f"prompt number {i} about something" for i in range(20)]

# Runs the CLI with HOOK executed when the N-th shard/direction file is written:
# another process's output appearing, a SIGTERM, ...
_HOOKED = """
import os, sys, signal, pathlib
import mlx.core as mx
from mlx_abliteration.export import save as export_save
from mlx_abliteration.io import model_io
calls = {{"n": 0}}
def hooking(real):
    def hooked(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == {after}:
{hook}
        return real(*args, **kwargs)
    return hooked
mx.save_safetensors = hooking(mx.save_safetensors)
export_save.write_shard = hooking(export_save.write_shard)
from mlx_abliteration.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_hooked(hook: str, *args: str, after: int = 1):
    code = _HOOKED.format(after=after, hook="\n".join("            " + line for line in hook.strip().splitlines()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "harmful.txt").write_text("\n".join("harmful " + p for p in PROMPTS))
    (d / "harmless.txt").write_text("\n".join("harmless " + p for p in PROMPTS))
    return d


def run_args(model, out, data, *extra):
    return [
        "run",
        "-m",
        str(model),
        "-o",
        str(out),
        "--harmful-dataset",
        str(data / "harmful.txt"),
        "--harmless-dataset",
        str(data / "harmless.txt"),
        "--max-prompts",
        "4",
        "--eval-size",
        "2",
        "--no-eval",
        "--use-layer",
        "1",
        *extra,
    ]


def assert_user_error(proc, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def hidden(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def snapshot(directory):
    return {p: (directory / p).read_bytes() for p in sorted(os.listdir(directory)) if (directory / p).is_file()}


# --- item 1: the output is never the source the user named --------------------------


def test_output_containing_the_source_or_a_dataset_is_refused_before_any_work(tiny_model, tmp_path, data):
    folder = tmp_path / "folder"
    folder.mkdir()
    model = folder / "model"
    import shutil

    shutil.copytree(tiny_model(), model)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder) | {f"model/{k}": v for k, v in snapshot(model).items()}
    assert_user_error(run_cli(*run_args(model, folder, data, "--overwrite")), "contains the source")
    assert_user_error(run_cli(*run_args(tiny_model(), data, data, "--overwrite")), "contains the source")
    assert_user_error(run_cli(*run_args(tiny_model(), data / "harmful.txt", data, "--overwrite")), "is the source")
    assert snapshot(folder) | {f"model/{k}": v for k, v in snapshot(model).items()} == before
    assert (data / "harmful.txt").is_file() and hidden(tmp_path) == []


# --- item 5: the final rename never replaces another process's output -----------------

_OTHER_PROCESS_WRITES = """
out = pathlib.Path(os.environ["OUT"])
out.mkdir(exist_ok=True)
(out / "theirs.txt").write_text("written by another process")
"""

_OTHER_PROCESS_REPLACES = """
out = pathlib.Path(os.environ["OUT"])
os.rename(out, out.parent / "moved-away")
out.mkdir()
(out / "theirs.txt").write_text("written by another process")
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_created_by_another_process_meanwhile_is_not_replaced(
    tiny_model, tmp_path, data, monkeypatch, overwrite
):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    proc = run_hooked(
        _OTHER_PROCESS_WRITES, *run_args(tiny_model(), out, data, *(["--overwrite"] if overwrite else []))
    )
    assert_user_error(proc, "another process")
    assert "saved" not in proc.stdout
    assert os.listdir(out) == ["theirs.txt"] and hidden(tmp_path) == []


def test_overwrite_replaces_only_the_output_seen_at_the_start(tiny_model, tmp_path, data, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    monkeypatch.setenv("OUT", str(out))
    proc = run_hooked(_OTHER_PROCESS_REPLACES, *run_args(tiny_model(), out, data, "--overwrite"))
    assert_user_error(proc, "another process")
    assert os.listdir(out) == ["theirs.txt"] and hidden(tmp_path) == []
    # Unchanged since the start: --overwrite replaces it.
    proc = run_cli(*run_args(tiny_model(), out, data, "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    assert (out / "abliteration_log.json").is_file() and not (out / "theirs.txt").exists() and hidden(tmp_path) == []


# --- item 12: SIGTERM cleans up; leftovers of killed processes are swept -------------


def test_sigterm_during_save_cleans_up_and_exits_143(tiny_model, tmp_path, data):
    out = tmp_path / "out"
    proc = run_hooked("os.kill(os.getpid(), signal.SIGTERM)", *run_args(tiny_model(num_shards=3), out, data), after=2)
    line = assert_user_error(proc, "SIGTERM", code=143)
    assert line.startswith("terminated")
    assert not out.exists() and hidden(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_dirs_of_dead_processes_are_swept_on_the_next_run(tiny_model, tmp_path, data):
    from mlx_abliteration.io.output_dir import _HOST

    dead = _dead_pid()
    stale = tmp_path / f".out.partial.{_HOST}.{dead}.abcdef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".other.partial.{_HOST}.{os.getppid()}.abcdef"  # a live process: left alone
    alive.mkdir()
    aside = tmp_path / f".previous.old.{_HOST}.{dead}.abcdef"  # killed mid-replace: put back
    aside.mkdir()
    (aside / "kept.txt").write_text("previous output")
    proc = run_cli(*run_args(tiny_model(), tmp_path / "out", data))
    assert proc.returncode == 0, proc.stderr
    assert hidden(tmp_path) == [alive.name]
    assert (tmp_path / "previous" / "kept.txt").read_text() == "previous output"


# --- item 13: the saved folder gets the umask's mode, not mkdtemp's 0700 ---------------


def test_saved_model_dir_mode_follows_the_umask(tiny_model, tmp_path, data):
    old = os.umask(0o022)
    try:
        proc = run_cli(*run_args(tiny_model(), tmp_path / "out", data))
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# --- items 1 and 5 for GGUF files: import-gguf and run -m FILE.gguf -------------------

from .test_gguf import vocab, write_gguf  # noqa: E402,F401  (vocab is a fixture)

_HOOKED_GGUF = """
import os, sys, pathlib
from mlx_abliteration.io import gguf_tokenizer
real = gguf_tokenizer.write_tokenizer_files
def hooked(*args, **kwargs):
    out = pathlib.Path(os.environ["OUT"])
    out.mkdir(exist_ok=True)
    (out / "theirs.txt").write_text("written by another process")
    return real(*args, **kwargs)
gguf_tokenizer.write_tokenizer_files = hooked
from mlx_abliteration.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_gguf_source_inside_the_output_is_never_deleted(tmp_path, vocab, data):  # noqa: F811
    folder = tmp_path / "folder"
    folder.mkdir()
    write_gguf(folder / "model.gguf", vocab, "llama")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    for command in (
        ["import-gguf", str(folder / "model.gguf"), "-o", str(folder), "--overwrite"],
        run_args(folder / "model.gguf", folder, data, "--overwrite", "--cache-dir", str(tmp_path / "cache")),
        ["import-gguf", str(folder / "model.gguf"), "-o", str(folder / "model.gguf"), "--overwrite"],
    ):
        assert_user_error(run_cli(*command), "source")
    assert snapshot(folder) == before and hidden(folder) == [] and hidden(tmp_path) == []
    assert not (tmp_path / "cache").exists()  # refused before converting anything


def test_two_imports_into_one_folder_the_second_fails_loudly(tmp_path, vocab, monkeypatch):  # noqa: F811
    write_gguf(tmp_path / "m.gguf", vocab, "llama")
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_ABLITERATION_LOG_FILE": os.devnull}
    proc = subprocess.run(
        [sys.executable, "-c", _HOOKED_GGUF, "import-gguf", str(tmp_path / "m.gguf"), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert_user_error(proc, "another process")
    assert os.listdir(out) == ["theirs.txt"] and hidden(tmp_path) == []


# --- item 10: every output path is checked before the work starts -----------------------


def test_bad_output_paths_fail_before_any_work(tiny_model, tmp_path, data):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_dir").mkdir()
    model = str(tiny_model())
    sets = ["--harmful-dataset", str(data / "harmful.txt"), "--harmless-dataset", str(data / "harmless.txt")]
    cases = [
        (["run", "-m", model, "-o", str(tmp_path / "out"), "--cache-dir", str(a_file), *sets], "--cache-dir"),
        (["eval", "-m", model, "--responses", str(tmp_path / "a_dir"), "--num-prompts", "2", *sets], "--responses"),
        (["eval", "-m", model, "--output", str(a_file / "r.json"), "--num-prompts", "2", *sets], "--output"),
        (
            [
                "probe",
                "-m",
                model,
                "--output",
                str(tmp_path / "d.safetensors"),
                "--stats-json",
                str(a_file / "s.json"),
                *sets,
            ],
            "--stats-json",
        ),
        (["probe", "-m", model, "--output", str(data / "harmful.txt"), *sets], "is the source"),
        (["chat", "-m", model, "--cache-dir", str(a_file)], "--cache-dir"),
        # issue 26: every command's output flags, not only run's -o
        (["generate-dataset", "--num-samples", "2", "--output-dir", str(a_file)], "--output-dir"),
        (["generate-dataset", "--num-samples", "2", "--output-dir", str(a_file / "sub")], "--output-dir"),
        (["search", "-m", model, "--study-dir", str(a_file / "studies"), *sets], "--study-dir"),
        (["search", "-m", model, "--study-name", "../x", "--study-dir", str(tmp_path / "s"), *sets], "--study-name"),
        (["gui", "--output-root", str(a_file / "outputs")], "--output-root"),
        (["eval", "-m", model, "--output", str(tmp_path / "r"), "--responses", str(tmp_path / "r"), *sets], "both"),
        (["probe", "-m", model, "--output", str(tmp_path / "p"), "--stats-json", str(tmp_path / "p"), *sets], "both"),
    ]
    for args, needle in cases:
        line = assert_user_error(run_cli(*args, stdin=""), needle)
        assert "probing" not in line
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"] and a_file.read_text() == "x"
    assert (data / "harmful.txt").read_text().startswith("harmful")


def test_probe_stats_json_into_a_missing_folder_is_created(tiny_model, tmp_path, data):
    proc = run_cli(
        "probe",
        "-m",
        str(tiny_model()),
        "--output",
        str(tmp_path / "new" / "d.safetensors"),
        "--stats-json",
        str(tmp_path / "other" / "s.json"),
        "--harmful-dataset",
        str(data / "harmful.txt"),
        "--harmless-dataset",
        str(data / "harmless.txt"),
        "--max-prompts",
        "4",
        "--eval-size",
        "2",
        "--use-layer",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "new" / "d.safetensors").is_file() and (tmp_path / "other" / "s.json").is_file()
