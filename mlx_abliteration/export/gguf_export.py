"""MLX model directory -> one GGUF file for llama.cpp (the families of ``io.gguf_families``): the inverse of ``io.gguf``'s import.

Tensor names, the Q/K row permutation and the Llama 3 ``rope_freqs`` table come from the
import's own tables and functions. Quantized (MLX affine, mxfp4...) weights are dequantized
in float32 first; every matrix is then written as ``--outtype`` (bf16, f16 or Q8_0 blocks of
32; Q8_0 falls back to f16 for a row length that is not a multiple of 32, as llama.cpp's
converter does) and every vector (norms, biases) as float32. A bfloat16 source written as
bf16 is copied bit for bit. Tensors are converted and written one at a time into a
temporary file next to the target, renamed over it at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from mlx_abliteration.errors import UserError
from mlx_abliteration.export.gguf_export_meta import add_hyperparameters, file_types, head_dim_of, model_args
from mlx_abliteration.export.gguf_export_vocab import add_vocab
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent
from mlx_abliteration.io.gguf_config import llama3_rope_factors
from mlx_abliteration.io.gguf_families import (
    EXPORT_MODEL_TYPES,
    Architecture,
    export_architecture,
    gguf_tensor_name,
    is_norm,
)
from mlx_abliteration.io.gguf_tensors import qk_unpermute_order
from mlx_abliteration.io.model_io import check_model_dir, load_shard, quant_params_for, read_config, weight_files
from mlx_abliteration.io.output_dir import check_output_file

if TYPE_CHECKING:
    import mlx.core as mx

    from mlx_abliteration.probe.capture import Progress

OUTTYPES = ("bf16", "f16", "q8_0")
Q8_0_BLOCK = 32
_CHUNK_ELEMENTS = 1 << 22
_IGNORED = ("rotary_emb.inv_freq",)  # recomputed by every runtime; old Hugging Face checkpoints carry it


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape, GGML type and how to compute its values."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    values: Callable[[], mx.array]

    @property
    def nbytes(self) -> int:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * type_size


def qk_row_order(arch: Architecture, rope_traditional: bool, rows: int, heads: int) -> np.ndarray | None:
    """Rows of a Q/K projection in the layout llama.cpp's RoPE for ``arch`` expects; None if already so.

    MLX's traditional RoPE rotates interleaved pairs, which is llama.cpp's layout for llama
    (the import's un-permutation is undone); otherwise the weights are in the half-split layout.
    """
    if arch.interleaved_rope == rope_traditional:
        return None
    order = qk_unpermute_order(rows, heads)
    return np.argsort(order) if arch.interleaved_rope else order


def _load_leaves(model_dir: Path) -> dict[str, dict[str, mx.array]]:
    """module path -> {leaf: array}, lazily loaded from every weight file."""

    modules: dict[str, dict[str, mx.array]] = {}
    for path in weight_files(model_dir):
        arrays, _ = load_shard(path)
        for name, array in arrays.items():
            if not name.endswith(_IGNORED):
                module, _, leaf = name.rpartition(".")
                modules.setdefault(module, {})[leaf] = array
    return modules


def _dense(module: str, leaves: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """The module's weight (dequantized to float32 if it is quantized) and bias."""

    if "scales" not in leaves:
        return {k: v for k, v in leaves.items() if k in ("weight", "bias")}
    quant = _quant(module, config)
    # float32 scales/biases: the stored values exactly, not rounded again to a 16-bit scale dtype
    scales, biases = leaves["scales"], leaves.get("biases")
    if scales.dtype in (mx.float16, mx.bfloat16):  # not mxfp4's uint8 exponents
        scales = scales.astype(mx.float32)
    if biases is not None:
        biases = biases.astype(mx.float32)
    weight = mx.dequantize(leaves["weight"], scales, biases, quant.group_size, quant.bits, mode=quant.mode)
    out = {"weight": weight.astype(mx.float32)}
    if "bias" in leaves:
        out["bias"] = leaves["bias"]
    return out


def _order_key(name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in order, then output_norm and output (llama.cpp's converter order)."""
    parts = name.split(".")
    if parts[0] == "token_embd":
        return (0, 0, name)
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (2, 0, name)


def plan_tensors(model_dir: Path, config: dict, arch: Architecture, outtype: str) -> list[PlannedTensor]:
    """Every tensor to write, validated (names, tied output) before anything is written."""
    from gguf import GGMLQuantizationType as Q

    args = model_args(config)
    matrix_type, _ = file_types(outtype)
    heads = int(args.num_attention_heads)
    kv_heads = int(getattr(args, "num_key_value_heads", None) or heads)
    traditional = bool(getattr(args, "rope_traditional", False))
    modules = _load_leaves(model_dir)
    tied = getattr(args, "tie_word_embeddings", None)
    tied = "weight" not in modules.get("lm_head", {}) if tied is None else bool(tied)  # gemma3_text: no lm_head
    planned = []
    for module, leaves in modules.items():
        if tied and module == "lm_head":
            continue  # the model ties it to the embedding: llama.cpp uses token_embd when output is absent
        for leaf in leaves:
            if leaf not in ("weight", "bias", "scales", "biases") or gguf_tensor_name(f"{module}.weight", arch) is None:
                raise UserError(
                    f"{model_dir} has tensor {module}.{leaf}, which has no llama.cpp name for {arch.model_type}; "
                    f"only plain {'/'.join(EXPORT_MODEL_TYPES)} decoders are supported"
                )
        for leaf in ("weight", "bias"):
            if leaf in leaves:
                planned.append(
                    _planned(module, leaf, leaves, config, matrix_type, arch, traditional, (heads, kv_heads))
                )
    names = {t.name for t in planned}
    if "token_embd.weight" not in names:
        raise UserError(f"{model_dir} has no model.embed_tokens.weight; the weights are incomplete")
    if not tied and "output.weight" not in names:
        raise UserError(f"{model_dir} has no lm_head.weight but config.json does not tie it to the embedding")
    if (factors := _llama3_factors(args)) is not None:
        planned.append(PlannedTensor("rope_freqs.weight", factors.shape, Q.F32, lambda: _mx(factors)))
    return sorted(planned, key=lambda t: _order_key(t.name))


def _mx(values: np.ndarray) -> mx.array:
    return mx.array(values.astype(np.float32))


def _planned(
    module: str,
    leaf: str,
    leaves: dict[str, mx.array],
    config: dict,
    matrix_type: Any,
    arch: Architecture,
    traditional: bool,
    heads: tuple[int, int],
) -> PlannedTensor:
    from gguf import GGMLQuantizationType as Q

    name = gguf_tensor_name(f"{module}.{leaf}", arch)
    assert name is not None  # checked by the caller
    shape = tuple(int(d) for d in leaves[leaf].shape)
    if leaf == "weight" and "scales" in leaves:  # uint32 words of packed elements (3-D for stacked experts)
        shape = (*shape[:-1], shape[-1] * 32 // _quant(module, config).bits)
    order = None
    if module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        order = qk_row_order(arch, traditional, shape[0], heads[0] if module.endswith("q_proj") else heads[1])
    # vectors, and the MoE router (as llama.cpp's converter keeps it), stay float32
    qtype = Q.F32 if len(shape) == 1 or ".ffn_gate_inp." in name else matrix_type
    if qtype == Q.Q8_0 and shape[-1] % Q8_0_BLOCK:
        qtype = Q.F16
    shift = arch.norm_shift if is_norm(f"{module}.{leaf}") else 0.0

    def values() -> mx.array:
        array = _dense(module, leaves, config)[leaf]
        if shift:  # llama.cpp stores Gemma's norm gains with the 1 added: 1 + w, computed in float32
            array = array.astype(mx.float32) + shift
        return array[mx.array(order)] if order is not None else array

    return PlannedTensor(name, shape, qtype, values)


def _quant(module: str, config: dict) -> Any:
    quant = quant_params_for(module, config)
    if quant is None:
        raise UserError(f"{module} is quantized but config.json has no quantization entry for it; restore config.json")
    return quant


def _llama3_factors(args: Any) -> np.ndarray | None:
    scaling = getattr(args, "rope_scaling", None) or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    head_dim = head_dim_of(args)
    return llama3_rope_factors(
        float(args.rope_theta),
        head_dim,
        float(scaling["factor"]),
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", 8192)),
    )


# --------------------------------------------------------------------------- writing


def tensor_bytes(tensor: PlannedTensor) -> np.ndarray:
    """The tensor's data as GGUF stores it (bf16 as uint16 bit patterns, Q8_0 as block bytes)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    array = tensor.values()
    if tensor.qtype == Q.F32:
        return np.array(array.astype(mx.float32))
    if tensor.qtype == Q.F16:
        return np.array(array.astype(mx.float16))
    if tensor.qtype == Q.BF16:
        return np.array(array.astype(mx.bfloat16).view(mx.uint16))  # a bf16 source keeps its bits
    rows = max(1, _CHUNK_ELEMENTS // int(np.prod(tensor.shape[1:])))
    chunks = [
        gguf.quants.quantize(np.array(array[start : start + rows].astype(mx.float32)), tensor.qtype)
        for start in range(0, tensor.shape[0], rows)
    ]
    return np.concatenate(chunks, axis=0)


def _write_tensors(writer: Any, tensors: list[PlannedTensor], progress: Progress | None) -> None:
    """Each tensor's data in order; a written tensor is dropped, so its loaded source arrays are freed
    (memory stays about one module, not the model)."""

    total = len(tensors)
    pending = list(reversed(tensors))
    tensors.clear()
    while pending:
        writer.write_tensor_data(tensor_bytes(pending.pop()))
        mx.clear_cache()
        if progress:
            progress(total - len(pending), total, "tensors")


def _check_output(output: Path, model_dir: Path, overwrite: bool) -> None:
    """Run's rules for an output: never the source, inside it or holding it; an existing file needs --overwrite."""
    if output.is_dir():
        raise UserError(f"-o/--output {output} is a folder; give a file name such as model.gguf")
    check_output_file(output, sources=[model_dir], flag="-o/--output")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it")


def export_gguf(
    model_dir: str | Path,
    output: str | Path,
    outtype: str = "bf16",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write the MLX model in ``model_dir`` as one GGUF file ``output``; atomic: nothing is left on error."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"unsupported --outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    output = Path(output).expanduser()
    _check_output(output, Path(model_dir).expanduser(), overwrite)  # as typed: before any reading
    model_dir = check_model_dir(Path(model_dir).expanduser())
    config = read_config(model_dir)
    arch = export_architecture(config["model_type"])
    if arch is None:
        raise UserError(
            f"GGUF export does not support model_type {config['model_type']!r}; supported: {', '.join(EXPORT_MODEL_TYPES)}"
        )
    tensors = plan_tensors(model_dir, config, arch, outtype)
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    writer = gguf.GGUFWriter(None, arch.gguf_arch)
    writer.add_name(model_dir.resolve().name)
    add_hyperparameters(writer, config, arch, outtype, n_vocab)
    add_vocab(writer, model_dir, n_vocab)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    ensure_parent(output)
    with atomic_path(output, suffix=".gguf", overwrite=overwrite) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, tensors, progress)
        finally:
            writer.close()
    return output


def describe(path: Path) -> dict[str, Any]:
    """Size and tensor types of a written GGUF file (for the command's summary line)."""
    import gguf

    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"bytes": path.stat().st_size, "tensors": len(reader.tensors), "types": types}
