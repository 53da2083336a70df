"""Where results go: output paths checked before any work, output dirs replaced safely.

The rules (every command, the GUI and the library follow them):

- An output is never a source the user named (model dir, ``.gguf`` file,
  dataset, direction or config file), never contains one and never lies
  inside one. Checked against what the user typed *and* what it resolved to.
- Every output path is checked before the work starts (``check_output_dir``,
  ``check_output_file``, ``check_cache_dir``): one-line ``UserError``s.
- A model dir is written into a temporary sibling (``make_temp_dir``), named
  ``.<name>.partial.<host>.<pid>.<random>`` and created with the umask's mode,
  then renamed over the output (``replace_dir``). A single file (report, GGUF,
  direction file) is written the same way by ``atomic_write.atomic_path``: every
  temporary file or folder of this package has that one name (``temp_name``),
  with at most a file-type suffix some writers insist on (``.safetensors``). That rename never replaces
  an output that another process wrote after this run's start check: without
  ``--overwrite`` it only lands where nothing (or an empty dir) is; with it,
  only over the very dir that was there at the start check.
- Temporary files and dirs of processes that died (SIGKILL, power loss) on this
  host are swept the next time a temporary file or dir is made in the same folder.
- SIGTERM is handled like Ctrl-C (``handle_sigterm``): temporary files are
  removed on the way out and the CLI exits with 143.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

from mlx_abliteration.errors import UserError
from mlx_abliteration.runtime.utils import process_alive

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>partial|old)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{6}(?:\.[a-z0-9]{1,16})?$"
)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled like Ctrl-C (cleanup on the way out)."""


# --- checks before the work ------------------------------------------------------


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def local_sources(*candidates: str | Path | None) -> list[Path]:
    """The candidates that name existing local paths (hub ids and None are skipped)."""
    out = []
    for c in candidates:
        if c is None or str(c).strip() == "":
            continue
        path = Path(str(c).strip()).expanduser()
        if path.exists() or str(c).lower().endswith(".gguf"):
            out.append(path)
    return out


def check_not_source(output: str | Path, sources: Iterable[str | Path], flag: str = "--output-dir") -> None:
    """Refuse an output that is, contains or lies inside one of ``sources``."""
    out = _resolved(output)
    for source in sources:
        src = _resolved(source)
        if out == src:
            raise UserError(f"{flag} {output} is the source {source}; choose another path")
        if out in src.parents:
            raise UserError(f"{flag} {output} contains the source {source}; choose a path that does not")
        if src in out.parents:
            raise UserError(f"{flag} {output} is inside the source {source}; choose a path outside it")


def _check_parent_writable(path: Path, flag: str, what: str, start: Path | None = None) -> None:
    """The nearest existing folder at or above ``start`` (default: ``path``'s parent) must be writable."""
    ancestor = path.parent if start is None else start
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another {what}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write to {ancestor}; choose a writable {what}")


def check_output_dir(
    output: str | Path,
    *,
    sources: Iterable[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--output-dir",
    fresh: bool = True,
) -> Path:
    """Check an output *dir* before any work, and remember what is there now (see ``replace_dir``).

    ``fresh=False`` (a second check later in the same run) keeps the state remembered at
    the start and fails if the output changed since.
    """
    path = Path(output).expanduser()
    check_not_source(path, sources, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {output} is a file; choose a directory path")
    if path.is_dir() and not overwrite and _non_empty(path):
        raise UserError(f"output dir {output} is not empty; pass --overwrite to replace it or choose another dir")
    _check_parent_writable(_resolved(path), flag, "--output-dir" if flag == "--output-dir" else "path")
    claims, key = _claims(), _key(path)
    if fresh or key not in claims:
        claims[key] = _state(path)
    elif _state(path) != claims[key]:
        raise OutputChanged(
            f"{output} was changed by another process after this run started; it was left as it is — "
            "rerun to replace it, or choose another --output-dir"
        )
    return path


def check_output_file(output: str | Path | None, *, sources: Iterable[str | Path] = (), flag: str = "--output") -> None:
    """Check an output *file* (report, direction, stats) before any work."""
    if output is None or str(output) == "":
        return
    path = Path(output).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {output} is a directory; give a file name")
    check_not_source(path, sources, flag)
    _check_parent_writable(_resolved(path), flag, "file name")


def check_distinct_outputs(**outputs: str | Path | None) -> None:
    """Two output flags of one command naming the same file: the second would silently replace the first."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None or str(path) == "":
            continue
        key = _resolved(path)
        if key in seen:
            raise UserError(f"{seen[key]} and {flag} are both {path}; give them different files")
        seen[key] = flag


def check_cache_dir(cache_dir: str | Path | None, flag: str = "--cache-dir") -> None:
    """A cache dir must be a folder or creatable as one (it may be read-only: cached models are only read)."""
    if cache_dir is None or str(cache_dir).strip() == "":
        return
    path = Path(cache_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {cache_dir} is a file; pass a folder (it is created if missing)")
    ancestor = path
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {cache_dir}: {ancestor} is a file, not a folder; pass another folder")


def check_work_dir(folder: str | Path, flag: str) -> Path:
    """A folder this command writes into (a study dir, the GUI's output root): a folder or creatable as one,
    and writable where it exists (or its nearest existing parent)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {folder} is a file; pass a folder (it is created if missing)")
    _check_parent_writable(path, flag, "folder", start=_resolved(path))
    return path


def _non_empty(path: Path) -> bool:
    try:
        return any(os.scandir(path))
    except FileNotFoundError:
        return False


# --- what was there at the start check -------------------------------------------

_local = threading.local()


def _claims() -> dict:
    if not hasattr(_local, "claims"):
        _local.claims = {}
    return _local.claims


def _key(path: Path) -> str:
    return str(_resolved(path))


@dataclass(frozen=True)
class _DirState:
    """A non-empty dir as it was: same inode, same entries (mtime) means nobody replaced or refilled it."""

    dev: int
    ino: int
    mtime_ns: int


def _state(path: Path) -> _DirState | None:
    """None: nothing to lose there (missing or an empty dir)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if os.path.isdir(path) and not os.path.islink(path) and not _non_empty(path):
        return None
    return _DirState(st.st_dev, st.st_ino, st.st_mtime_ns)


def start_state(output: str | Path) -> _DirState | None:
    """The state remembered by this thread's last ``check_output_dir`` of ``output`` (taken now if none)."""
    claims = _claims()
    key = _key(Path(output))
    if key not in claims:
        claims[key] = _state(Path(output))
    return claims[key]


def forget(output: str | Path) -> None:
    _claims().pop(_key(Path(output)), None)


# --- temporary dirs ----------------------------------------------------------------


def temp_name(name: str, kind: str = "partial", suffix: str = "") -> str:
    """The one name of every temporary file and dir (``sweep_stale`` knows it); ``suffix`` e.g. ".safetensors"."""
    if suffix and not re.fullmatch(r"\.[a-z0-9]{1,16}", suffix):
        raise ValueError(f"temp_name suffix must look like '.safetensors', not {suffix!r}")
    return f".{name}.{kind}.{_HOST}.{os.getpid()}.{os.urandom(3).hex()}{suffix}"


def make_temp_dir(output: str | Path) -> Path:
    """A new empty sibling of ``output`` to write into (parent created; stale temp dirs swept first)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(output.parent)
    while True:
        tmp = output.parent / temp_name(output.name)
        try:
            os.mkdir(tmp, 0o777)  # the umask decides, as for any folder the user creates (mkdtemp's 0700 would stick)
        except FileExistsError:
            continue
        return tmp


def sweep_stale(parent: str | Path) -> list[Path]:
    """Remove the temporary files and dirs that dead processes of this host left in ``parent``.

    An ``.old`` dir (a previous output moved aside by a process killed before
    its new output landed) is put back when its output name is free.
    """
    parent = Path(parent)
    done: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or match["host"] != _HOST or process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if match["kind"] == "old" and not os.path.lexists(parent / match["name"]):
            with contextlib.suppress(OSError):
                path.rename(parent / match["name"])
                done.append(path)
                continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        done.append(path)
    return done


# --- the final rename ----------------------------------------------------------------


class OutputChanged(UserError):
    """The output appeared or changed after this run's start check; it was left alone."""


def replace_dir(tmp: str | Path, output: str | Path, overwrite: bool = False) -> None:
    """Move the finished ``tmp`` dir to ``output``; never over another process's output.

    ``tmp`` is left in place on failure (the caller removes it).
    """
    tmp, output = Path(tmp), Path(output)
    expected = start_state(output)
    try:
        if expected is None or not overwrite:
            _rename_onto_nothing(tmp, output)
            return
        now = _state(output)
        if now is None:  # removed or emptied meanwhile: nothing of anyone's to replace
            _rename_onto_nothing(tmp, output)
            return
        old = output.parent / temp_name(output.name, "old")
        if now == expected:
            os.rename(output, old)
        moved = _state(old) if now == expected else None
        if moved is None or (moved.dev, moved.ino) != (expected.dev, expected.ino):
            if moved is not None:
                _put_back(old, output)
            raise OutputChanged(
                f"{output} was replaced by another process after this run started; it was left as it is and this "
                "run's result was discarded — rerun to replace it"
            )
        try:
            os.rename(tmp, output)
        except OSError:
            _put_back(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        forget(output)


def _rename_onto_nothing(tmp: Path, output: Path) -> None:
    # rename(2) replaces an empty dir but fails on a non-empty one or a file: exactly
    # the outputs that another process may have written after the start check.
    try:
        if output.is_symlink() or (output.exists() and not output.is_dir()):
            raise FileExistsError(errno.EEXIST, "exists", str(output))
        os.rename(tmp, output)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputChanged(
                f"{output} was created by another process after this run started; it was left as it is and this "
                "run's result was discarded — choose another --output-dir or pass --overwrite"
            ) from None
        raise


def _put_back(old: Path, output: Path) -> None:
    with contextlib.suppress(OSError):
        os.rename(old, output)


# --- SIGTERM ---------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM raise ``Terminated`` (a ``KeyboardInterrupt``) in the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
