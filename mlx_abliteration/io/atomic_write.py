"""The one way this package writes a user-visible file: atomically.

A report, a direction file or a GGUF file is written to a temporary file in
the target's own folder, named as every temporary of this package is
(``output_dir.temp_name``, so a killed process's leftovers are swept by the
next write there), flushed and fsynced, then moved over the target with
``os.replace`` (or, without ``overwrite``, only where nothing is). On any failure (full disk, read-only
folder, Ctrl-C) the temporary file is removed and the previous file, if
any, is untouched. Failures the user can fix (full disk, no permission,
read-only file system... see :func:`is_user_write_failure`) become a
one-line :class:`UserError`; anything else (an MLX out-of-memory, a bug)
keeps its type and traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.output_dir import sweep_stale, temp_name

_HINTS = {
    "ENOSPC": "free some disk space or write elsewhere",
    "EDQUOT": "free some space under your quota or write elsewhere",
    "EFBIG": "write to a file system that allows large files",
    "EROFS": "the file system is read-only; write elsewhere",
    "EACCES": "you have no write permission there; choose a writable location",
    "EPERM": "you have no write permission there; choose a writable location",
    "ENOENT": "create the folder first or choose an existing one",
    "ENOTDIR": "a part of the path is a file, not a folder; choose another path",
    "EISDIR": "the path is a folder; give a file name",
    "EEXIST": "a file is in the way of a folder to create; choose another path",
}


# MLX reports failed writes as RuntimeErrors without an errno; these are its exact messages.
_MLX_OPEN_FAILED = re.compile(r"^\[(?:save|save_safetensors|save_gguf)\] Failed to open (?:file )?(?P<path>.+)$")
_MLX_WRITE_FAILED = re.compile(r"^\[write\] Unable to write \d+ bytes to file")


def is_user_write_failure(err: BaseException) -> bool:
    """True for a failed write the user can fix: an OSError whose errno is in
    ``_HINTS`` (ENOSPC, EACCES, EROFS...) or MLX's own open/short-write message.
    Everything else (out of memory, EIO, a bug) is not, and must propagate."""
    if isinstance(err, OSError):
        return err.errno is not None and errno.errorcode.get(err.errno, "") in _HINTS
    if isinstance(err, RuntimeError):
        text = str(err).strip()
        return bool(_MLX_OPEN_FAILED.match(text) or _MLX_WRITE_FAILED.match(text))
    return False


def _diagnose_open(target: str) -> OSError | None:
    """The OSError behind MLX's "Failed to open file X", found by opening X ourselves."""
    try:
        with open(target, "ab"):
            pass
    except OSError as err:
        return err
    return None


def write_error(path: str | Path, err: BaseException) -> UserError:
    """A one-line UserError for a failed write of ``path`` (only for ``is_user_write_failure(err)``)."""
    if isinstance(err, RuntimeError) and (match := _MLX_OPEN_FAILED.match(str(err).strip())):
        err = _diagnose_open(match["path"]) or err
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, "")
        reason = err.strerror or str(err)
        hint = _HINTS.get(name, "check free disk space and permissions")
    elif isinstance(err, RuntimeError) and _MLX_WRITE_FAILED.match(str(err).strip()):
        reason = f"short write: {' '.join(str(err).split())}"  # no errno from MLX: full disk, quota or file-size limit
        hint = "free some disk space (or quota) or write elsewhere"
    else:
        reason = " ".join(str(err).split()) or type(err).__name__
        hint = "check free disk space and permissions"
    return UserError(
        f"cannot write {path} ({reason}); {hint} — nothing was written and what was there before is unchanged"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    For writers that take a file name (``mx.save_safetensors``); ``suffix``
    is appended to the temporary name for writers that insist on one.
    ``overwrite=False``: the result lands only where no file is, never over one
    that another process created meanwhile (``OutputExists``).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    tmp = path.with_name(temp_name(path.name, suffix=suffix))
    try:
        try:
            sweep_stale(path.parent)  # what killed writers left here
            # O_EXCL: never write through a file or symlink planted under the temp name;
            # mode 0o666 so the result gets the user's usual (umask) permissions.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
            yield tmp
            _fsync(tmp)
            if overwrite:
                os.replace(tmp, path)
            else:
                _move_onto_nothing(tmp, path)
            _fsync_dir(path.parent)
        except (OSError, RuntimeError) as err:
            if not is_user_write_failure(err):
                raise
            raise write_error(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class OutputExists(UserError):
    """The target appeared after the start check; it was left alone."""


def _move_onto_nothing(tmp: Path, path: Path) -> None:
    """rename(2) without replacing: a hard link fails on an existing name (EEXIST)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise OutputExists(
            f"{path} was created by another process after this run started; it was left as it is and this "
            "run's result was discarded — pass --overwrite to replace it"
        ) from None
    except OSError as err:
        if is_user_write_failure(err) and err.errno not in (errno.EPERM, errno.EACCES):
            raise
        # a file system without hard links (FAT, some network mounts): check, then rename
        if os.path.lexists(path):
            raise OutputExists(
                f"{path} was created by another process after this run started; it was left as it is"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """``open`` for writing, atomically (see module doc). ``mode`` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding) as handle:
        handle.write(text)


def write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> None:
    dumps_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


def ensure_parent(path: str | Path) -> None:
    """Create the folder of ``path``; failures become a one-line UserError."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        raise write_error(path, err) from err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
