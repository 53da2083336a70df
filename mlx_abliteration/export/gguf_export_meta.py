"""GGUF export's metadata: the architecture keys llama.cpp reads, written as its converter writes them."""

from __future__ import annotations

from typing import Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_reader import Architecture
from mlx_abliteration.io.model_checks import model_classes


def file_types(outtype: str) -> tuple[Any, Any]:
    """(GGML type for matrices, ``general.file_type``) of an ``--outtype``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "f16": (Q.F16, F.MOSTLY_F16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    }[outtype]


def model_args(config: dict) -> Any:
    return model_classes(config)[1].from_dict(config)


def head_dim_of(args: Any) -> int:
    return int(getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads)


def add_hyperparameters(writer: Any, config: dict, arch: Architecture, outtype: str, n_vocab: int) -> None:
    """The architecture keys llama.cpp reads, as its converter writes them for ``arch``."""
    import gguf

    args = model_args(config)
    context = config.get("max_position_embeddings") or getattr(args, "max_position_embeddings", None)
    if not context:
        raise UserError("config.json has no max_position_embeddings; llama.cpp needs the context length")
    heads = int(args.num_attention_heads)
    head_dim = head_dim_of(args)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(int(context))
    writer.add_embedding_length(int(args.hidden_size))
    writer.add_block_count(int(args.num_hidden_layers))
    writer.add_feed_forward_length(int(args.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(args, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_file_type(file_types(outtype)[1])
    if arch.model_type == "llama":  # llama.cpp's converter adds these two for llama only
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim)
    if head_dim != int(args.hidden_size) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_rope_scaling(writer, getattr(args, "rope_scaling", None), arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_scaling(writer: Any, scaling: dict | None, arch: Architecture) -> None:
    """Linear and YaRN scaling as keys; Llama 3 scaling is the ``rope_freqs`` tensor instead."""
    from gguf import RopeScalingType

    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default") or (kind == "llama3" and arch.model_type == "llama"):
        return
    assert scaling is not None
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    else:
        raise UserError(
            f"rope scaling {kind!r} in config.json cannot be written for {arch.model_type}; supported: linear, yarn"
            + (", llama3" if arch.model_type == "llama" else "")
        )
