"""JSON-lines logging: record shape, serialization of awkward payloads, setup."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.runtime import logging_config
from mlx_abliteration.runtime.logging_config import LOG_ENV, LOGGER_NAME, JsonFormatter, setup_logging, to_jsonable


@pytest.fixture
def clean_logger():
    """Leave the package logger as it was found (handlers, level)."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level
    yield logger
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)


def _record(message="step done", args=(), extra_info=None, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("mlx_abliteration.pipeline.flow", logging.INFO, __file__, 1, message, args, exc_info)
    if extra_info is not None:
        record.extra_info = extra_info
    return record


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclasses.dataclass
class _Stats:
    layer: int
    norm: float
    where: Path


class _FakeMlxArray:
    """Duck-types mlx.core.array (tolist/item/size/shape/dtype) without importing mlx."""

    def __init__(self, values, dtype="mlx.core.float32"):
        self._values = np.asarray(values, dtype=np.float32)
        self.dtype, self.shape, self.size = dtype, self._values.shape, self._values.size

    def tolist(self):
        return self._values.tolist()

    def item(self):
        return self._values.item()


def test_record_has_fields_and_extra_info_under_its_own_key():
    line = JsonFormatter().format(_record("probed %d layers", (28,), {"message": "not the message", "n": 3}))
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "extra_info"}
    assert entry["message"] == "probed 28 layers"
    assert entry["extra_info"] == {"message": "not the message", "n": 3}
    assert entry["level"] == "INFO" and entry["logger"] == "mlx_abliteration.pipeline.flow"
    assert entry["time"].endswith("+00:00")


def test_awkward_payload_is_serialized():
    payload = {
        "path": Path("/tmp/model"),
        "np_scalar": np.float32(0.5),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "np_array": np.arange(3),
        "mlx_scalar": _FakeMlxArray(1.5),
        "mlx_array": _FakeMlxArray([[1, 2], [3, 4]]),
        "set": {3, 1, 2},
        "tuple": (1, "a"),
        "dataclass": _Stats(layer=14, norm=np.float64(2.0), where=Path("out")),
        "error": ValueError("bad strength"),
        "nan": float("nan"),
        "inf": -float("inf"),
        7: "int key",
        "dtype": np.dtype("float16"),
    }
    entry = json.loads(JsonFormatter().format(_record(extra_info=payload)))
    info = entry["extra_info"]
    assert info["path"] == "/tmp/model"
    assert info["np_scalar"] == 0.5 and info["np_int"] == 7 and info["np_bool"] is True
    assert info["np_array"] == [0, 1, 2]
    assert info["mlx_scalar"] == 1.5 and info["mlx_array"] == [[1.0, 2.0], [3.0, 4.0]]
    assert info["set"] == [1, 2, 3] and info["tuple"] == [1, "a"]
    assert info["dataclass"] == {"layer": 14, "norm": 2.0, "where": "out"}
    assert info["error"] == {"type": "ValueError", "message": "bad strength"}
    assert info["nan"] == "NaN" and info["inf"] == "-Infinity"
    assert info["7"] == "int key" and info["dtype"] == "float16"


def test_large_arrays_are_summarized():
    summary = to_jsonable(np.zeros((64, 64), dtype=np.float16))
    assert summary == {"shape": [64, 64], "dtype": "float16", "size": 4096}


def test_circular_and_broken_objects_never_raise():
    loop: dict = {}
    loop["self"] = loop

    class Broken:
        def __str__(self):
            raise RuntimeError("boom")

    entry = json.loads(JsonFormatter().format(_record(extra_info={"loop": loop, "broken": Broken()})))
    assert entry["extra_info"]["loop"] == {"self": "<circular reference>"}
    assert entry["extra_info"]["broken"].startswith("<unserializable Broken")


def test_bad_format_args_keep_the_event():
    entry = json.loads(JsonFormatter().format(_record("layers %d", ("many",))))
    assert entry["message"].startswith("layers %d")


def test_exception_traceback_is_included():
    try:
        raise KeyError("layer 99")
    except KeyError:
        import sys

        entry = json.loads(JsonFormatter().format(_record("failed", exc_info=sys.exc_info())))
    assert "KeyError: 'layer 99'" in entry["exception"]


def test_setup_writes_json_lines_and_is_idempotent(tmp_path, clean_logger):
    target = tmp_path / "deep" / "dir" / "log.jsonl"
    assert setup_logging(target) == target
    assert setup_logging(target, level="DEBUG") == target
    flagged = [h for h in clean_logger.handlers if getattr(h, "_mlx_abliteration_json", False)]
    assert len(flagged) == 1
    logging.getLogger("mlx_abliteration.pipeline.flow").debug("probe", extra={"extra_info": {"layer": np.int32(3)}})
    flagged[0].flush()
    (entry,) = _lines(target)
    assert entry["message"] == "probe" and entry["extra_info"] == {"layer": 3}


def test_env_variable_overrides_default(tmp_path, monkeypatch, clean_logger):
    target = tmp_path / "env.jsonl"
    monkeypatch.setenv(LOG_ENV, str(target))
    assert setup_logging() == target
    assert target.exists()


def test_default_location(monkeypatch, tmp_path, clean_logger):
    monkeypatch.delenv(LOG_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert setup_logging() == tmp_path / ".mlx-llm" / "abliteration-toolkit-cli" / "log.jsonl"


def test_unwritable_location_falls_back_with_warning(tmp_path, capsys, monkeypatch, clean_logger):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(logging_config.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = setup_logging(blocker / "log.jsonl")
    assert path == tmp_path / "tmp" / f"mlx-abliteration-{os.getuid()}" / "log.jsonl"
    assert (path.parent.stat().st_mode & 0o777) == 0o700 and (path.stat().st_mode & 0o777) == 0o600
    err = capsys.readouterr().err
    assert "warning: cannot write log file" in err and f"logging to {path}" in err


def test_no_writable_location_disables_file_logging(tmp_path, capsys, monkeypatch, clean_logger):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(logging_config.tempfile, "gettempdir", lambda: str(blocker))
    assert setup_logging(blocker / "log.jsonl") == Path(os.devnull)
    assert "JSON logs are off" in capsys.readouterr().err
    logging.getLogger("mlx_abliteration.x").warning("still fine")


def test_unknown_level_is_a_user_error(tmp_path, clean_logger):
    with pytest.raises(UserError, match="unknown log level 'LOUD'"):
        setup_logging(tmp_path / "log.jsonl", level="LOUD")


# --- the fallback in the shared temp dir is private and never follows a planted symlink ---


def _cli_with_unwritable_log(tmp_path):
    """``probe`` of a missing model: it sets up logging, then fails fast with a one-line error."""
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), LOG_ENV: str(blocker / "log.jsonl")}
    return subprocess.run(
        [sys.executable, "-m", "mlx_abliteration", "probe", "-m", str(tmp_path / "no-model")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_fallback_refuses_a_planted_symlinked_folder(tmp_path):
    (tmp_path / "tmp").mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "log.jsonl").write_text("someone else's file\n")
    (tmp_path / "tmp" / f"mlx-abliteration-{os.getuid()}").symlink_to(victim)
    proc = _cli_with_unwritable_log(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "JSON logs are off" in proc.stderr and "not a private folder" in proc.stderr
    assert (victim / "log.jsonl").read_text() == "someone else's file\n"


def test_fallback_refuses_a_planted_symlinked_file(tmp_path):
    private = tmp_path / "tmp" / f"mlx-abliteration-{os.getuid()}"
    private.mkdir(parents=True, mode=0o700)
    victim = tmp_path / "victim.jsonl"
    victim.write_text("someone else's file\n")
    (private / "log.jsonl").symlink_to(victim)
    proc = _cli_with_unwritable_log(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "JSON logs are off" in proc.stderr
    assert victim.read_text() == "someone else's file\n"


def test_fallback_refuses_a_folder_others_can_write(tmp_path, capsys, monkeypatch, clean_logger):
    shared = tmp_path / f"mlx-abliteration-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(logging_config.tempfile, "gettempdir", lambda: str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert setup_logging(blocker / "log.jsonl") == Path(os.devnull)
    assert not (shared / "log.jsonl").exists()


def test_fallback_is_used_and_private(tmp_path):
    proc = _cli_with_unwritable_log(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    log = tmp_path / "tmp" / f"mlx-abliteration-{os.getuid()}" / "log.jsonl"
    assert f"logging to {log} instead" in proc.stderr
    assert (log.parent.stat().st_mode & 0o777) == 0o700
