"""Writing a safetensors shard in one pass: each byte hashed as it is written, unedited bytes copied.

The file is what ``mx.save_safetensors`` writes (an 8-byte little-endian
header length, then the header as compact JSON with sorted keys and
``"__metadata__"`` = the string metadata or null, then the tensors' bytes
back to back, no padding); only the order of the tensors' bytes may differ
(MLX's follows a hash map's, this one the source file's). A tensor left as
it was is copied from its source file's byte range (never decoded or
re-encoded); an edited one is written from its array's memory. The SHA256
of the file is taken from the same buffers as they are written (no second
read), and on Linux the kernel is told to start writing each chunk to disk
at once (``sync_file_range``), so the disk works while the rest is
prepared instead of after the process ends.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import mlx.core as mx

from mlx_abliteration.errors import UserError

if TYPE_CHECKING:
    import mlx.core as mx

CHUNK = 1 << 25  # bytes hashed and written at a time (32 MiB)

_DTYPE_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
}


def dtype_name(dtype: mx.Dtype) -> str:
    """The safetensors name of an MLX dtype (``BF16``, ``F32``, ...)."""
    name = str(dtype).rpartition(".")[2]
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {dtype}") from None


@dataclass(frozen=True)
class SourceTensor:
    """One tensor's place in a safetensors file: dtype name, shape, absolute byte offset and length."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of a safetensors file (its header only; the caller has validated the file)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    return {
        name: SourceTensor(
            info["dtype"],
            tuple(info["shape"]),
            start + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


@dataclass(frozen=True)
class Entry:
    """A tensor to write: from ``source`` (a byte range of ``source_path``) or from ``data`` (an array's memory)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: memoryview | None = None
    source_path: Path | None = None
    source: SourceTensor | None = None


def array_entry(name: str, array: mx.array) -> Entry:
    """An entry for an evaluated array (made row-contiguous first if it is not)."""

    view = memoryview(cast(Any, array))  # MLX arrays export their memory (the stubs do not say so)
    if not view.c_contiguous:
        view.release()
        array = mx.contiguous(array)
        mx.eval(array)
        view = memoryview(cast(Any, array))
    return Entry(name, dtype_name(array.dtype), tuple(array.shape), array.nbytes, data=view)


def source_entry(name: str, path: Path, tensor: SourceTensor) -> Entry:
    return Entry(name, tensor.dtype, tensor.shape, tensor.nbytes, source_path=path, source=tensor)


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and JSON header ``mx.save_safetensors`` writes for ``entries`` in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata) if metadata else None}
    offset = 0
    for e in entries:
        header[e.name] = {"data_offsets": [offset, offset + e.nbytes], "dtype": e.dtype, "shape": list(e.shape)}
        offset += e.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return struct.pack("<Q", len(text)) + text


class WriteCancelled(Exception):
    """The save was abandoned (another shard failed, or the user interrupted) while this one was written."""


def write_shard(
    path: Path, entries: list[Entry], metadata: dict[str, str] | None, cancel: threading.Event | None = None
) -> str:
    """Write ``entries`` to ``path`` as one safetensors file; returns the SHA256 of the bytes written."""
    digest = hashlib.sha256()
    head = header_bytes(entries, metadata)
    expected = len(head) + sum(e.nbytes for e in entries)
    buffer = bytearray(min(CHUNK, max((e.nbytes for e in entries if e.source), default=0)))
    with open(path, "wb", buffering=0) as out:
        position = _put(out, head, 0, digest)
        for e in entries:
            if e.source is not None and e.source_path is not None:
                position = _copy_range(e.source_path, e.source, out, position, digest, buffer, cancel)
            elif e.data is not None and e.nbytes:
                data = e.data.cast("B")
                for start in range(0, e.nbytes, CHUNK):
                    if cancel is not None and cancel.is_set():
                        raise WriteCancelled(str(path))
                    position = _put(out, data[start : start + CHUNK], position, digest)
        size = os.fstat(out.fileno()).st_size
    if size != expected or position != expected:
        raise OSError(errno.EIO, f"wrote {size} bytes of {expected}", str(path))
    return digest.hexdigest()


def _copy_range(
    path: Path,
    tensor: SourceTensor,
    out: BinaryIO,
    position: int,
    digest: Any,
    buffer: bytearray,
    cancel: threading.Event | None,
) -> int:
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as src:
        src.seek(tensor.offset)
        left = tensor.nbytes
        while left:
            if cancel is not None and cancel.is_set():
                raise WriteCancelled(str(path))
            got = src.readinto(view[: min(left, len(view))])
            if not got:
                raise UserError(f"{path} ended early while it was copied; it changed during the save: restore it")
            position = _put(out, view[:got], position, digest)
            left -= got
    return position


def _put(out: BinaryIO, chunk: bytes | memoryview, position: int, digest: Any) -> int:
    """Hash ``chunk``, write all of it at ``position`` and start its writeback; the new position."""
    digest.update(chunk)
    view = memoryview(chunk)
    while view.nbytes:
        written = out.write(view)
        if not written:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]
    start_writeback(out.fileno(), position, len(chunk))
    return position + len(chunk)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", func)


_SYNC_FILE_RANGE_WRITE = 2
# Errors of a hint that only says the call cannot help here (not a failed write).
_NOT_SUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset+length)`` of ``fd`` to disk without waiting (Linux; elsewhere nothing).

    The page cache otherwise holds the bytes until the kernel's dirty limits
    or a later ``sync``; a 16 GB save then ended with seconds of flushing.
    A full disk or an I/O error it reports is raised; "not supported" is not.
    """
    func = _sync_file_range()
    if func is None:
        return
    if func(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err not in _NOT_SUPPORTED:
            raise OSError(err, os.strerror(err))


def start_file_writeback(path: Path) -> None:
    """``start_writeback`` for a whole file already written (a byte-for-byte copied shard)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
