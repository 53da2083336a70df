"""GGUF tensors -> safetensors: each tensor decoded (or kept quantized where MLX stores the same blocks), planned into shards and written."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_families import Architecture, is_norm, mlx_tensor_name
from mlx_abliteration.io.gguf_reader import IGNORED_TENSORS, metadata

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor


MAX_SHARD_BYTES = 2 << 30


_CHUNK_ELEMENTS = 1 << 22


GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0


@dataclass
class OutputTensor:
    """One safetensors entry, produced as a stream of row chunks."""

    name: str
    dtype: str  # safetensors code: F32, F16, BF16, U32
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


_NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)  # wraps only for NaNs
    rounded[np.isnan(x)] = 0x7FC0
    return rounded


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_bfloat16_bits(x) if dtype == "bfloat16" else x.astype(np.float16)


def _native_blocks(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 weights, scales, biases) as float32 for rows of Q4_0/Q4_1/Q8_0 blocks."""
    rows = raw.shape[0]
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[type_name]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    values: np.ndarray
    if type_name == "Q8_0":
        values = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q -> unsigned q + 128
        biases = -128.0 * scales
    else:
        header = 4 if type_name == "Q4_1" else 2
        nibbles = blocks[..., header:]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # GGUF order: low halves first
        values = values[..., 0::2] | (values[..., 1::2] << 4)  # MLX order: element 2k in the low nibble
        biases = (
            blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            if type_name == "Q4_1"
            else -8.0 * scales
        )
    packed = np.ascontiguousarray(values).reshape(rows, -1).view("<u4")
    return packed, scales, biases


def qk_unpermute_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved -> half-split RoPE pairs)."""
    head_dim = n_rows // n_heads
    gguf_rows = np.arange(n_rows).reshape(n_heads, head_dim // 2, 2)
    return gguf_rows.transpose(0, 2, 1).reshape(-1)


def _source_rows(tensor: ReaderTensor) -> np.ndarray:
    """The tensor's raw data as rows; a 1-D float tensor becomes one element per row so it can be reordered."""
    import gguf

    data = tensor.data
    if data.ndim > 1:
        return data
    if gguf.GGML_QUANT_SIZES[tensor.tensor_type][0] == 1:
        return data.reshape(int(tensor.n_elements), -1)
    return data.reshape(1, -1)


def tensor_outputs(
    tensor: ReaderTensor, name: str, dtype: str, row_order: np.ndarray | None = None, shift: float = 0.0
) -> list[OutputTensor]:
    """Output entries for one GGUF tensor: a quantized triple or one float tensor.

    ``row_order`` selects source rows (the Q/K un-permutation); ``shift`` is subtracted from the
    values (Gemma's norms, stored as ``1 + w``); chunks are read lazily. A 3-D tensor (stacked
    experts) is read as rows of its last dimension.
    """
    raw = _source_rows(tensor)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if raw.ndim > 2:
        raw = raw.reshape(-1, raw.shape[-1])
    row_elements = int(tensor.n_elements) // raw.shape[0]

    def row_chunks() -> Iterator[np.ndarray]:
        step = max(1, _CHUNK_ELEMENTS // row_elements)
        for start in range(0, raw.shape[0], step):
            yield raw[row_order[start : start + step]] if row_order is not None else raw[start : start + step]

    if tensor.tensor_type.name in _NATIVE_BITS and len(shape) >= 2 and not shift:
        return _quantized_outputs(name, shape, tensor.tensor_type.name, dtype, row_chunks)
    qtype = tensor.tensor_type

    def dequantized() -> Iterator[np.ndarray]:
        import gguf

        for rows in row_chunks():
            values = gguf.quants.dequantize(rows, qtype)
            if shift:  # in float64: exact for every float32 value stored
                values = (values.astype(np.float64) - shift).astype(np.float32)
            yield _cast(values, dtype)

    return [OutputTensor(name, _FLOAT_CODE[dtype], shape, dequantized)]


_FLOAT_CODE = {"bfloat16": "BF16", "float16": "F16"}


def _quantized_outputs(
    name: str, shape: tuple[int, ...], type_name: str, dtype: str, row_chunks: Callable[[], Iterator[np.ndarray]]
) -> list[OutputTensor]:
    """weight/scales/biases of an MLX affine-quantized layer, decoded from Q4_0/Q4_1/Q8_0 blocks."""

    def part(index: int) -> Callable[[], Iterator[np.ndarray]]:
        def produce() -> Iterator[np.ndarray]:
            for rows in row_chunks():
                piece = _native_blocks(rows, type_name)[index]
                yield piece if index == 0 else _cast(piece, dtype)

        return produce

    stem = name.removesuffix(".weight")
    lead, columns = shape[:-1], shape[-1]  # (experts,) rows, columns for stacked experts
    groups = columns // GROUP_SIZE
    return [
        OutputTensor(f"{stem}.weight", "U32", (*lead, columns * _NATIVE_BITS[type_name] // 32), part(0)),
        OutputTensor(f"{stem}.scales", _FLOAT_CODE[dtype], (*lead, groups), part(1)),
        OutputTensor(f"{stem}.biases", _FLOAT_CODE[dtype], (*lead, groups), part(2)),
    ]


def check_tensor_type(tensor: ReaderTensor, path: Path) -> None:
    """Fail before writing anything when the ``gguf`` package cannot decode a tensor type."""
    import gguf

    type_name = tensor.tensor_type.name
    if type_name in _NATIVE_BITS:
        return
    type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor.tensor_type)
    except NotImplementedError:
        raise UserError(
            f"tensor {tensor.name} in {Path(path).name} has type {type_name}, which the gguf package cannot dequantize; "
            "re-export the model with another quantization (e.g. Q8_0, Q4_K_M or F16)"
        ) from None


def plan_tensors(reader: GGUFReader, path: Path, arch: Architecture, dtype: str) -> list[OutputTensor]:
    """All output tensors in GGUF order, validated before any byte is written."""
    heads = int(metadata(reader, f"{arch.gguf_arch}.attention.head_count"))
    kv_heads = int(metadata(reader, f"{arch.gguf_arch}.attention.head_count_kv", heads))
    outputs: list[OutputTensor] = []
    for tensor in reader.tensors:
        if tensor.name in IGNORED_TENSORS:
            continue
        name = mlx_tensor_name(tensor.name, arch)
        if name is None:
            raise UserError(
                f"tensor {tensor.name} in {Path(path).name} has no mapping for architecture {arch.gguf_arch} "
                "(multimodal GGUFs and variants mlx-lm cannot run are not supported); use a plain decoder-only model"
            )
        check_tensor_type(tensor, path)
        order = None
        if arch.interleaved_rope and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            out_features = int(tensor.shape[-1])  # GGUF lists dims innermost first
            order = qk_unpermute_order(out_features, heads if ".attn_q." in tensor.name else kv_heads)
        shift = arch.norm_shift if is_norm(name) else 0.0
        outputs.extend(tensor_outputs(tensor, name, dtype, order, shift))
    return outputs


def shard_plan(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[OutputTensor], progress: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file, streaming each tensor's chunks after the header."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors:
            written = 0
            for chunk in tensor.chunks():
                chunk = np.ascontiguousarray(chunk)
                f.write(chunk.data.cast("B"))
                written += chunk.nbytes
            if written != tensor.nbytes:
                raise RuntimeError(f"internal error: {tensor.name} produced {written} bytes, expected {tensor.nbytes}")
            if progress:
                progress(tensor.nbytes)


def write_weights(out_dir: Path, tensors: list[OutputTensor], max_shard_bytes: int | None = None) -> None:
    """``model.safetensors``, or numbered shards plus an index when over ``max_shard_bytes``.

    Written by ``write_safetensors`` rather than the ``safetensors`` library:
    its ``save_file`` needs every tensor of a shard in memory at once, while
    this streams one dequantized tensor at a time (memory stays about one
    tensor, not one 5 GB shard). Where this tool reads safetensors headers
    (``model_io``), the library checks them.
    """

    shards = shard_plan(tensors, max_shard_bytes or MAX_SHARD_BYTES)
    total = sum(t.nbytes for t in tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", file=sys.stderr, leave=False)
    try:
        if len(shards) == 1:
            write_safetensors(out_dir / "model.safetensors", shards[0], bar.update)
            return
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out_dir / file_name, shard, bar.update)
            weight_map.update({t.name: file_name for t in shard})
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    finally:
        bar.close()
