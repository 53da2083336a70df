"""JSON-lines logging: one object per event, safe for any ``extra_info`` payload.

    log = logging.getLogger("mlx_abliteration.pipeline")
    log.info("probed layers", extra={"extra_info": {"layers": 28, "norm": mx.array(3.2)}})

writes ``{"time": ..., "level": "INFO", "logger": "mlx_abliteration.pipeline.flow",
"message": "probed layers", "extra_info": {"layers": 28, "norm": 3.2}}``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import errno
import getpass
import io
import json
import logging
import math
import os
import stat
import sys
import tempfile
import traceback
from pathlib import Path, PurePath
from typing import Any

from mlx_abliteration.errors import UserError

LOG_ENV = "MLX_ABLITERATION_LOG_FILE"
DEFAULT_LOG_FILE = Path("~/.mlx-llm/abliteration-toolkit-cli/log.jsonl")
LOGGER_NAME = "mlx_abliteration"
# Arrays above this many elements are logged as a summary, not their values.
MAX_ARRAY_ELEMENTS = 1024
_MAX_DEPTH = 20
_HANDLER_FLAG = "_mlx_abliteration_json"


def to_jsonable(value: object, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> object:
    """A JSON-serializable copy of ``value``; never raises.

    Handles paths, numpy and mlx scalars and arrays (duck-typed, no import),
    sets, dataclasses, enums, datetimes, bytes and exceptions; anything else
    becomes its ``str``. Non-finite floats become the strings "NaN",
    "Infinity" and "-Infinity" so the output is strict JSON.
    """
    try:
        return _convert(value, _depth, _seen)
    except Exception as err:  # a broken __str__ or __iter__ must not lose the log line
        return f"<unserializable {type(value).__name__}: {type(err).__name__}>"


def _convert(value: object, depth: int, seen: frozenset[int]) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _float(value)
    if depth >= _MAX_DEPTH:
        return f"<nested deeper than {_MAX_DEPTH}>"
    if id(value) in seen:
        return "<circular reference>"
    inner = seen | {id(value)}
    if isinstance(value, dict):
        return {str(key): to_jsonable(item, depth + 1, inner) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, depth + 1, inner) for item in value]
    if isinstance(value, (set, frozenset)):
        items = [to_jsonable(item, depth + 1, inner) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    return _convert_object(value, depth, inner)


def _convert_object(value: object, depth: int, seen: frozenset[int]) -> object:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, depth + 1, seen)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return to_jsonable(fields, depth + 1, seen)
    if _is_array_like(value):
        return _array(value, depth, seen)
    return str(value)


def _is_array_like(value: object) -> bool:
    return callable(getattr(value, "tolist", None)) or callable(getattr(value, "item", None))


def _array(value: Any, depth: int, seen: frozenset[int]) -> object:
    """numpy/mlx arrays and scalars (duck-typed: ``tolist``/``item``): values when small, a summary when large."""
    size = getattr(value, "size", 1)
    size = size() if callable(size) else size
    if isinstance(size, int) and size > MAX_ARRAY_ELEMENTS:
        return {
            "shape": to_jsonable(getattr(value, "shape", None)),
            "dtype": str(getattr(value, "dtype", "?")),
            "size": size,
        }
    plain = value.tolist() if callable(getattr(value, "tolist", None)) else value.item()
    return to_jsonable(plain, depth + 1, seen)


def _float(value: float) -> object:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra_info, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._message(record),
        }
        extra_info = getattr(record, "extra_info", None)
        if extra_info is not None:
            entry["extra_info"] = to_jsonable(extra_info)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, ensure_ascii=False, allow_nan=False)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:  # bad %-args: keep the template rather than lose the event
            return f"{record.msg} (args: {to_jsonable(record.args)})"


def default_log_file() -> Path:
    """``$MLX_ABLITERATION_LOG_FILE``, else ``~/.mlx-llm/abliteration-toolkit-cli/log.jsonl``."""
    return Path(os.environ.get(LOG_ENV) or DEFAULT_LOG_FILE).expanduser()


class _JsonFileHandler(logging.FileHandler):
    """A log file that, when a write fails (full disk, quota, file removed...), says so in one line on
    stderr and stops logging; ``logging``'s own handler printed a traceback for every record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        if self.failed:
            return
        self.failed = True
        print(
            f"warning: cannot write log file {self.baseFilename} ({err.strerror or err}); "
            "JSON logs are off for the rest of this run",
            file=sys.stderr,
        )
        try:
            self.close()  # its unwritten buffer goes: the next flush would fail again
        except OSError:
            pass


def _open_handler(path: Path, private: bool = False) -> logging.FileHandler:
    if private:
        _private_dir(path.parent)
        handler: logging.FileHandler = _PrivateFileHandler(path, mode="a", encoding="utf-8")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _JsonFileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_FLAG, True)
    return handler


def fallback_log_file() -> Path:
    """Per-user fallback in the temp dir: ``<tmp>/mlx-abliteration-<uid>/log.jsonl`` (folder 0700)."""
    user = os.getuid() if hasattr(os, "getuid") else _user_name()
    return Path(tempfile.gettempdir()) / f"mlx-abliteration-{user}" / "log.jsonl"


def _user_name() -> str:
    return "".join(c for c in getpass.getuser() if c.isalnum() or c in "-_") or "user"


def _private_dir(folder: Path) -> None:
    """Create ``folder`` 0700, or accept it only if it is a real folder of ours that nobody else can write.

    The temp dir is shared: another user may have planted a symlink or a
    folder under our name to make us append to their file or read ours.
    """

    folder.parent.mkdir(parents=True, exist_ok=True)  # the temp dir itself
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    if not stat.S_ISDIR(info.st_mode) or not mine or info.st_mode & 0o077:
        raise OSError(
            errno.EPERM, "not a private folder of this user (a symlink, another user's or group/world-accessible)"
        )


class _PrivateFileHandler(_JsonFileHandler):
    """Appends to a regular file of ours, never through a symlink (O_NOFOLLOW), created 0600."""

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.baseFilename, flags, 0o600)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            os.close(fd)
            raise OSError(errno.EPERM, "not a regular file of this user")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise UserError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    return number


def setup_logging(log_file: Path | str | None = None, level: int | str = "INFO") -> Path:
    """Send the package's log records to a JSON-lines file and return its path.

    The path is ``log_file``, else ``$MLX_ABLITERATION_LOG_FILE``, else the
    default. Calling again replaces the previous handler (no duplicates). An
    unwritable location falls back to a private per-user folder in the temp
    directory (symlinks refused) with a warning on
    stderr; if that fails too, logs are dropped and ``os.devnull`` is returned.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(_level_number(level))
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_FLAG, False)]:
        logger.removeHandler(handler)
        handler.close()
    wanted = Path(log_file).expanduser() if log_file else default_log_file()
    fallback = fallback_log_file()
    for path in (wanted, fallback):
        try:
            logger.addHandler(_open_handler(path, private=path == fallback and path != wanted))
        except OSError as err:
            print(f"warning: cannot write log file {path} ({err.strerror or err})", file=sys.stderr)
            continue
        if path != wanted:
            print(f"warning: logging to {path} instead", file=sys.stderr)
        return path
    print("warning: no writable log location; JSON logs are off for this run", file=sys.stderr)
    return Path(os.devnull)
