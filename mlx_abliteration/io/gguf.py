"""GGUF file -> MLX model directory (safetensors weights, config.json, tokenizer files).

Q4_0 / Q4_1 / Q8_0 tensors become MLX affine-quantized weights (group 32) losslessly:
their blocks are exactly ``scale * q + bias`` with unsigned ``q``. Every other type is
dequantized with the ``gguf`` package (``mx.load`` decodes some K-quants wrongly) to
float16/bfloat16. Tensors stream row chunk by row chunk from the memory-mapped GGUF
into safetensors files, so peak memory stays near one chunk, not the model.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.io.gguf_tokenizer import eos_token_ids, pre_tokenizer_style, write_tokenizer_files
from mlx_abliteration.io.output_dir import OutputChanged, check_output_dir, make_temp_dir, replace_dir
from mlx_abliteration.runtime.utils import cache_root, sha256_file

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

IMPORTER_VERSION = 1
MARKER_FILE = "gguf_import.json"
DTYPES = ("bfloat16", "float16")
MAX_SHARD_BYTES = 2 << 30
_CHUNK_ELEMENTS = 1 << 22
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    interleaved_rope: bool  # llama.cpp permutes Q/K rows for its interleaved ("normal") RoPE


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", interleaved_rope=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", interleaved_rope=False),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED_TENSORS = {"rope_freqs.weight"}  # folded into config.json's rope_scaling


# --------------------------------------------------------------------------- reading


def open_gguf(path: Path) -> GGUFReader:
    """A ``gguf.GGUFReader`` over ``path``; bad files become one-line ``UserError``s."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf model file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # what the reader raises on damaged headers
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "GGMLQuantizationType" in reason:
            raise UserError(
                f"{path} holds a tensor of unknown type ({reason}); upgrade the gguf package "
                "(pip install -U gguf) or re-export the model with a common type such as Q8_0 or Q4_K_M"
            ) from None
        raise UserError(
            f"cannot read GGUF file {path} ({reason}); the file is truncated or corrupt, download it again"
        ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise UserError(
                f"GGUF file {path} is truncated: tensor {tensor.name} ends past the end of the file; download it again"
            )
    return reader


_REQUIRED = object()


def metadata(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value; a missing key without a default is a ``UserError``."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise UserError(f"the GGUF file lacks the metadata key {key!r}; re-export it with a current llama.cpp")
    return default


def architecture_of(reader: GGUFReader, path: Path) -> tuple[str, Architecture]:
    name = metadata(reader, "general.architecture", None)
    if name not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {name!r} in {Path(path).name}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return name, ARCHITECTURES[name]


def mlx_tensor_name(gguf_name: str) -> str | None:
    """mlx-lm parameter name for a GGUF tensor name; None if the name is unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES and parts[1] in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def gguf_tensor_name(mlx_name: str) -> str | None:
    """llama.cpp's name for an mlx-lm parameter name (the inverse of ``mlx_tensor_name``); None if unknown."""
    module, _, leaf = mlx_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    for gguf_module, mlx_module in _GLOBAL_NAMES.items():
        if module == mlx_module:
            return f"{gguf_module}.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf_module, mlx_module in _LAYER_NAMES.items():
            if parts[3] == mlx_module:
                return f"blk.{parts[2]}.{gguf_module}.{leaf}"
    return None


# --------------------------------------------------------------------------- tensors


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
    tensor: ReaderTensor, name: str, dtype: str, row_order: np.ndarray | None = None
) -> list[OutputTensor]:
    """Output entries for one GGUF tensor: a quantized triple or one float tensor.

    ``row_order`` selects source rows (the Q/K un-permutation); chunks are read lazily.
    """
    raw = _source_rows(tensor)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    row_elements = int(tensor.n_elements) // raw.shape[0]

    def row_chunks() -> Iterator[np.ndarray]:
        step = max(1, _CHUNK_ELEMENTS // row_elements)
        for start in range(0, raw.shape[0], step):
            yield raw[row_order[start : start + step]] if row_order is not None else raw[start : start + step]

    if tensor.tensor_type.name in _NATIVE_BITS and len(shape) == 2:
        return _quantized_outputs(name, shape, tensor.tensor_type.name, dtype, row_chunks)
    qtype = tensor.tensor_type

    def dequantized() -> Iterator[np.ndarray]:
        import gguf

        for rows in row_chunks():
            yield _cast(gguf.quants.dequantize(rows, qtype), dtype)

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
    groups = shape[1] // GROUP_SIZE
    return [
        OutputTensor(f"{stem}.weight", "U32", (shape[0], shape[1] * _NATIVE_BITS[type_name] // 32), part(0)),
        OutputTensor(f"{stem}.scales", _FLOAT_CODE[dtype], (shape[0], groups), part(1)),
        OutputTensor(f"{stem}.biases", _FLOAT_CODE[dtype], (shape[0], groups), part(2)),
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
    heads = int(metadata(reader, f"{arch.model_type}.attention.head_count"))
    kv_heads = int(metadata(reader, f"{arch.model_type}.attention.head_count_kv", heads))
    outputs: list[OutputTensor] = []
    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        name = mlx_tensor_name(tensor.name)
        if name is None:
            raise UserError(
                f"tensor {tensor.name} in {Path(path).name} has no mapping for architecture {arch.model_type} "
                "(mixture-of-experts and multimodal GGUFs are not supported); use a plain decoder-only model"
            )
        check_tensor_type(tensor, path)
        order = None
        if arch.interleaved_rope and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            out_features = int(tensor.shape[-1])  # GGUF lists dims innermost first
            order = qk_unpermute_order(out_features, heads if ".attn_q." in tensor.name else kv_heads)
        outputs.extend(tensor_outputs(tensor, name, dtype, order))
    return outputs


# --------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------- config


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """Llama 3.x per-frequency rope scaling factors: the ``rope_freqs`` tensor llama.cpp stores for them."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    return np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )


def _llama3_rope_scaling(reader: GGUFReader, arch: str, head_dim: int, theta: float) -> dict | None:
    """Recover Llama 3.x rope scaling from the ``rope_freqs`` tensor llama.cpp stores instead."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    factor = float(factors.max())
    for low, high, original in ((1.0, 4.0, 8192),):
        expected = llama3_rope_factors(theta, head_dim, factor, low, high, original)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise UserError(f"unrecognised rope_freqs table in this {arch} GGUF; only Llama 3.x rope scaling is supported")


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int, theta: float) -> dict | None:
    kind = metadata(reader, f"{arch}.rope.scaling.type", None)
    if kind in (None, "none"):
        return _llama3_rope_scaling(reader, arch, head_dim, theta)
    factor = float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = metadata(reader, f"{arch}.rope.scaling.original_context_length")
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": int(original)}
    raise UserError(f"unsupported rope scaling {kind!r} in this {arch} GGUF; supported: linear, yarn")


def quantization_config(tensors: list[OutputTensor]) -> dict | None:
    """Top-level default (most common bits) plus per-layer entries where layers differ."""
    by_name = {t.name: t for t in tensors}
    bits_by_layer = {}
    for name, tensor in by_name.items():
        if name.endswith(".scales"):
            layer = name.removesuffix(".scales")
            bits_by_layer[layer] = by_name[f"{layer}.weight"].shape[1] * 32 // (tensor.shape[1] * GROUP_SIZE)
    if not bits_by_layer:
        return None
    values = list(bits_by_layer.values())
    default_bits = max(set(values), key=values.count)
    config: dict = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for layer, bits in bits_by_layer.items():
        if bits != default_bits:
            config[layer] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for tensor in tensors:  # dequantized matrices must stay unquantized, whatever the loader's default
        layer = tensor.name.removesuffix(".weight")
        if tensor.name.endswith(".weight") and len(tensor.shape) == 2 and layer not in bits_by_layer:
            config[layer] = False
    return config


def build_config(
    reader: GGUFReader, arch: Architecture, tensors: list[OutputTensor], dtype: str, eos_ids: list[int]
) -> dict:
    prefix = arch.model_type
    heads = int(metadata(reader, f"{prefix}.attention.head_count"))
    hidden = int(metadata(reader, f"{prefix}.embedding_length"))
    head_dim = int(metadata(reader, f"{prefix}.attention.key_length", hidden // heads))
    theta = float(metadata(reader, f"{prefix}.rope.freq_base", 10000.0))
    names = {t.name for t in tensors}
    embed = next(t for t in tensors if t.name == "model.embed_tokens.weight")
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(metadata(reader, f"{prefix}.feed_forward_length")),
        "num_hidden_layers": int(metadata(reader, f"{prefix}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata(reader, f"{prefix}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(metadata(reader, f"{prefix}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_traditional": False,  # Q/K rows were un-permuted to the Hugging Face layout
        "max_position_embeddings": int(metadata(reader, f"{prefix}.context_length", 4096)),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "lm_head.weight" not in names,
        "torch_dtype": dtype,
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in names
        config["mlp_bias"] = "model.layers.0.mlp.down_proj.bias" in names
    if (scaling := _rope_scaling(reader, prefix, head_dim, theta)) is not None:
        config["rope_scaling"] = scaling
    bos = metadata(reader, "tokenizer.ggml.bos_token_id", None)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if (quant := quantization_config(tensors)) is not None:
        config["quantization"] = quant
        config["quantization_config"] = quant
    return config


# --------------------------------------------------------------------------- conversion


def convert_gguf(
    gguf_path: Path,
    output_dir: Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    expected_sha256: str | None = None,
) -> Path:
    """Convert a GGUF file into an MLX model dir; atomic: nothing is left behind on error.

    ``expected_sha256``, when given, must match the file's hash (checked before writing).
    """
    return _convert(Path(gguf_path), Path(output_dir), dtype, overwrite, expected_sha256, None)


def _convert(
    gguf_path: Path,
    output_dir: Path,
    dtype: str,
    overwrite: bool,
    expected_sha256: str | None,
    known_sha256: str | None,
) -> Path:

    if dtype not in DTYPES:
        raise UserError(f"unsupported --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    # The output may not be, contain or lie in the file the user named (DIR/m.gguf -o DIR --overwrite
    # deleted it); what is there now is remembered so the final rename never replaces a newer output.
    check_output_dir(output_dir, sources=[gguf_path], overwrite=overwrite)
    reader = open_gguf(gguf_path)
    _, arch = architecture_of(reader, gguf_path)
    tensors = plan_tensors(reader, gguf_path, arch, dtype)
    pre_tokenizer_style(reader, gguf_path)  # unsupported tokenizers fail before any writing
    if not any(t.name == "model.embed_tokens.weight" for t in tensors):
        raise UserError(f"{gguf_path.name} has no token_embd.weight tensor; the GGUF is incomplete")
    sha256 = known_sha256 or sha256_file(gguf_path)
    if expected_sha256 and sha256 != expected_sha256:
        raise UserError(f"sha256 of {gguf_path} is {sha256}, expected {expected_sha256}; download the file again")
    eos_ids = eos_token_ids(reader)
    config = build_config(reader, arch, tensors, dtype, eos_ids)

    try:
        temp_dir = make_temp_dir(output_dir)  # also sweeps temp dirs of killed conversions
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        raise write_error(output_dir, err) from err
    try:
        write_weights(temp_dir, tensors)
        (temp_dir / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(reader, temp_dir, gguf_path, config["max_position_embeddings"], eos_ids)
        marker = {"source": gguf_path.name, "sha256": sha256, "dtype": dtype, "importer_version": IMPORTER_VERSION}
        (temp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        replace_dir(temp_dir, output_dir, overwrite)
    except (OSError, RuntimeError) as err:  # full disk, read-only folder: one line, nothing left
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not is_user_write_failure(err):
            raise  # out of memory, a bug: keep its type and traceback
        raise write_error(output_dir, err) from err
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return output_dir


def conversion_is_current(model_dir: Path, sha256: str, dtype: str) -> bool:
    """True when ``model_dir`` holds a complete conversion of that file with this importer."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        marker.get("sha256") == sha256
        and marker.get("dtype") == dtype
        and marker.get("importer_version") == IMPORTER_VERSION
        and (Path(model_dir) / "config.json").is_file()
    )


def convert_gguf_cached(gguf_path: Path, cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert once per (file content, dtype) into ``<cache>/converted/<sha256[:16]>-<dtype>``."""
    gguf_path = Path(gguf_path)
    open_gguf(gguf_path)  # clear errors before hashing a possibly large non-GGUF file
    sha256 = sha256_file(gguf_path)
    root = cache_root(cache_dir)
    target = root / "converted" / f"{sha256[:16]}-{dtype}"
    if conversion_is_current(target, sha256, dtype):
        return target
    print(f"converting {gguf_path.name} into {target} (once; cached by file hash)", file=sys.stderr)
    try:
        return _convert(gguf_path, target, dtype, True, None, sha256)
    except OutputChanged:
        if conversion_is_current(target, sha256, dtype):
            return target  # a concurrent conversion of the same file finished first
        raise
