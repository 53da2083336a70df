"""GGUF export's metadata: the architecture keys llama.cpp reads, written as its converter writes them."""

from __future__ import annotations

from typing import Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_config_families import (
    GEMMA2_DEFAULT_WINDOW,
    GEMMA3_LOCAL_ROPE_BASE,
    GEMMA3_SLIDING_PATTERN,
    query_pre_attn_scalar,
)
from mlx_abliteration.io.gguf_families import Architecture
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
    if arch.gguf_arch == "llama":  # llama.cpp's converter adds these two for llama only
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim)
    if head_dim != int(args.hidden_size) // heads or arch.norm_shift:  # Gemma's converter always writes them
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_rope_scaling(writer, getattr(args, "rope_scaling", None), arch)
    _add_family_keys(writer, config, args, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_scaling(writer: Any, scaling: dict | None, arch: Architecture) -> None:
    """Linear and YaRN scaling as keys; Llama 3 scaling is the ``rope_freqs`` tensor instead."""
    from gguf import RopeScalingType

    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default") or (kind == "llama3" and arch.gguf_arch == "llama"):
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
            + (", llama3" if arch.gguf_arch == "llama" else "")
        )


def _refuse(arch: Architecture, what: str) -> UserError:
    return UserError(
        f"{arch.model_type} models with {what} cannot be written as GGUF: llama.cpp's {arch.gguf_arch} assumes otherwise"
    )


def _add_family_keys(writer: Any, config: dict, args: Any, arch: Architecture) -> None:
    """Experts, Gemma's soft caps, windows and query scale, Phi-3's partial RoPE: what llama.cpp reads or assumes."""
    if arch.model_type == "mixtral":
        writer.add_expert_count(int(args.num_local_experts))
        writer.add_expert_used_count(int(args.num_experts_per_tok))
    elif arch.model_type == "qwen3_moe":
        if int(args.decoder_sparse_step) != 1 or list(args.mlp_only_layers):
            raise _refuse(arch, "dense layers (decoder_sparse_step/mlp_only_layers)")
        if not args.norm_topk_prob:
            raise _refuse(arch, "norm_topk_prob false")
        writer.add_expert_count(int(args.num_experts))
        writer.add_expert_used_count(int(args.num_experts_per_tok))
        writer.add_expert_feed_forward_length(int(args.moe_intermediate_size))
    elif arch.model_type == "phi3":
        heads, hidden = int(args.num_attention_heads), int(args.hidden_size)
        writer.add_rope_scaling_orig_ctx_len(int(args.original_max_position_embeddings))
        writer.add_rope_dimension_count(int(float(args.partial_rotary_factor) * hidden) // heads)
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    elif arch.norm_shift:
        _add_gemma_keys(writer, config, args, arch)


def _add_gemma_keys(writer: Any, config: dict, args: Any, arch: Architecture) -> None:
    expected = query_pre_attn_scalar(
        arch.gguf_arch,
        int(args.num_hidden_layers),
        int(args.hidden_size),
        int(args.num_attention_heads),
        int(args.head_dim),
    )
    if float(args.query_pre_attn_scalar) != expected:
        raise _refuse(arch, f"query_pre_attn_scalar {args.query_pre_attn_scalar} (not {expected})")
    if arch.gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(float(args.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(args.final_logit_softcapping))
        writer.add_sliding_window(int(config.get("sliding_window") or GEMMA2_DEFAULT_WINDOW))
        return
    pattern = int(args.sliding_window_pattern)
    if pattern not in (1, GEMMA3_SLIDING_PATTERN):
        raise _refuse(arch, f"sliding_window_pattern {pattern} (not {GEMMA3_SLIDING_PATTERN})")
    if pattern != 1 and float(args.rope_local_base_freq) != GEMMA3_LOCAL_ROPE_BASE:
        raise _refuse(arch, f"rope_local_base_freq {args.rope_local_base_freq}")
    if pattern != 1:
        writer.add_sliding_window(int(args.sliding_window))
