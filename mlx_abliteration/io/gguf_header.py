"""A GGUF file's header checked with bounded memory and time, before ``gguf.GGUFReader`` sees it.

gguf-py's reader trusts every count in the file: an array that claims 2**62 elements in a
132-byte file makes it loop and allocate without bound. ``check_gguf_header`` walks the same
structure over a memory map: every count and length is bounded by the bytes that remain in the
file (an array of N four-byte values needs 4*N bytes, a string its length), nesting and the total
number of metadata values are capped, every tensor has at most 8 dimensions, a known type and a
data range inside the file. Anything else is a one-line ``UserError`` naming the file and the
problem, found in time linear in the header's size, touching no more memory than the header.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from mlx_abliteration.errors import UserError

SUPPORTED_VERSIONS = (2, 3)  # gguf-py's reader: version 1 had 32-bit counts
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # GGML_MAX_DIMS is 4; 8 leaves room for newer files
MAX_ARRAY_DEPTH = 4  # llama.cpp writes flat arrays; gguf-py's reader recurses once per level
# gguf-py's reader makes a few numpy views per metadata value (about 300 bytes each): this keeps it
# under ~5 GB on a file full of one-byte values. Real vocabularies have well under a million tokens.
MAX_METADATA_VALUES = 1 << 24

_STRING, _ARRAY = 8, 9
# value type -> byte size (gguf.GGUFValueType): u8 i8 u16 i16 u32 i32 f32 bool . . u64 i64 f64
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Corrupt(Exception):
    """One problem in the header, in words."""


class _UnknownType(Exception):
    """A tensor type this gguf package has no size for."""


@dataclass
class _Cursor:
    data: mmap.mmap | bytes
    order: str  # struct byte order: "<" or ">"
    pos: int = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> int:
        """Skip ``n`` bytes; their start."""
        if n > self.left:
            raise _Corrupt(f"{what} needs {n} bytes at offset {self.pos}, but only {self.left} remain")
        start = self.pos
        self.pos += n
        return start

    def uint(self, size: int, what: str) -> int:
        start = self.take(size, what)
        return int(struct.unpack_from(self.order + {4: "I", 8: "Q"}[size], self.data, start)[0])

    def string(self, what: str) -> bytes:
        length = self.uint(8, f"the length of {what}")
        start = self.take(length, what)
        return bytes(self.data[start : start + length])

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not UTF-8") from None


def check_gguf_header(path: Path) -> None:
    """Refuse (``UserError``) a GGUF file whose header is malformed, truncated or hostile."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise _Corrupt("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _check(data)
    except _UnknownType as err:
        raise UserError(
            f"{path} holds a tensor of unknown type ({err}); upgrade the gguf package (pip install -U gguf) "
            "or re-export the model with a common type such as Q8_0 or Q4_K_M"
        ) from None
    except _Corrupt as err:
        raise UserError(
            f"cannot read GGUF file {path} ({err}); the file is truncated or corrupt, download it again"
        ) from None
    except OSError as err:
        raise UserError(
            f"cannot read GGUF file {path} ({err.strerror or err}); check the path and permissions"
        ) from None


def _check(data: mmap.mmap | bytes) -> None:
    cur = _Cursor(data, "<")
    cur.take(4, "the magic")
    if bytes(data[0:4]) != b"GGUF":
        raise _Corrupt("it does not start with 'GGUF'")
    version = cur.uint(4, "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (gguf-py reads those too)
        cur.order = ">"
        version = struct.unpack_from(">I", data, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise _Corrupt(f"GGUF version {version}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    tensor_count = cur.uint(8, "the tensor count")
    kv_count = cur.uint(8, "the metadata count")
    # the smallest key/value is 13 bytes (empty key, type, one byte); the smallest tensor info 24 bytes
    if kv_count * 13 > cur.left:
        raise _Corrupt(f"it claims {kv_count} metadata entries, more than its {cur.left} remaining bytes can hold")
    if tensor_count * 24 > cur.left:
        raise _Corrupt(f"it claims {tensor_count} tensors, more than its {cur.left} remaining bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    budget = [MAX_METADATA_VALUES]
    for index in range(kv_count):
        key = cur.text(f"the key of metadata entry {index}")
        vtype = cur.uint(4, f"the type of {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                raise _Corrupt("general.alignment is not a uint32")
            alignment = cur.uint(4, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"general.alignment {alignment} is not a power of two")
            continue
        _skip_value(cur, vtype, repr(key), 0, budget)
    tensors = [_tensor_info(cur, index) for index in range(tensor_count)]
    data_start = -(-cur.pos // alignment) * alignment
    names: set[str] = set()
    for name, n_bytes, offset in tensors:
        if name in names:
            raise _Corrupt(f"tensor {name} appears twice")
        names.add(name)
        end = data_start + offset + n_bytes
        if end > len(data):
            raise _Corrupt(f"tensor {name} ends at byte {end}, past the end of the file ({len(data)} bytes)")


def _skip_value(cur: _Cursor, vtype: int, what: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Corrupt(f"more than {MAX_METADATA_VALUES} metadata values (at {what})")
    if vtype in _FIXED_SIZES:
        cur.take(_FIXED_SIZES[vtype], what)
    elif vtype == _STRING:
        cur.take(cur.uint(8, f"the length of {what}"), what)
    elif vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype = cur.uint(4, f"the element type of {what}")
        count = cur.uint(8, f"the length of {what}")
        if etype in _FIXED_SIZES:  # checked as a whole: no loop over a claimed count
            cur.take(count * _FIXED_SIZES[etype], f"{what} ({count} values)")
            budget[0] -= count
            if budget[0] < 0:
                raise _Corrupt(f"{what} has {count} values, more than {MAX_METADATA_VALUES} in all")
        elif etype in (_STRING, _ARRAY):
            least = 8 if etype == _STRING else 12  # an empty string; an empty array
            if count * least > cur.left:
                raise _Corrupt(f"{what} claims {count} values, more than the {cur.left} remaining bytes can hold")
            for _ in range(count):
                _skip_value(cur, etype, what, depth + 1, budget)
        else:
            raise _Corrupt(f"{what} has elements of unknown type {etype}")
    else:
        raise _Corrupt(f"{what} has unknown value type {vtype}")


def _tensor_info(cur: _Cursor, index: int) -> tuple[str, int, int]:
    """(name, data bytes, offset from the start of the data) of one tensor info."""
    import gguf

    name = cur.text(f"the name of tensor {index}")
    n_dims = cur.uint(4, f"the dimension count of tensor {name}")
    if n_dims > MAX_DIMS:
        raise _Corrupt(f"tensor {name} claims {n_dims} dimensions (at most {MAX_DIMS})")
    elements = 1
    for _ in range(n_dims):
        elements *= cur.uint(8, f"the shape of tensor {name}")
    raw_type = cur.uint(4, f"the type of tensor {name}")
    offset = cur.uint(8, f"the data offset of tensor {name}")
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise _UnknownType(f"tensor {name} has type id {raw_type}, which this gguf package does not know") from None
    if elements % block:
        raise _Corrupt(f"tensor {name} has {elements} values, not a whole number of {block}-value blocks")
    return name, elements // block * type_size, offset
