"""config.json entries of one model family, from GGUF metadata and what llama.cpp assumes without it.

llama.cpp fixes some hyperparameters per family instead of storing them (``llama-model.cpp``):
Gemma 2 alternates sliding-window and global layers (the even ones slide), Gemma 3 has five
sliding layers per global one with a local RoPE base of 10000, both scale queries by
1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models), Qwen3-MoE renormalizes its top-k
router weights. Those become the config entries mlx-lm reads; ``gguf_export_meta`` refuses a
model whose values differ, since a GGUF file could not carry them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_families import Architecture
from mlx_abliteration.io.gguf_reader import metadata

if TYPE_CHECKING:
    from gguf import GGUFReader

    from mlx_abliteration.io.gguf_tensors import OutputTensor

GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA2_DEFAULT_WINDOW = 4096
GEMMA2_DEFAULT_ATTN_SOFTCAP, GEMMA2_DEFAULT_FINAL_SOFTCAP = 50.0, 30.0
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # the 27B models scale queries by hidden/heads, not head_dim


def query_pre_attn_scalar(gguf_arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query scale llama.cpp uses for a Gemma model of that shape (its ``f_attention_scale``)."""
    return hidden // heads if layers == _LAYERS_27B[gguf_arch] else head_dim


def _expert_config(reader: GGUFReader, arch: Architecture, tensors: list[OutputTensor], config: dict) -> dict[str, Any]:
    prefix = arch.gguf_arch
    experts = int(metadata(reader, f"{prefix}.expert_count"))
    used = int(metadata(reader, f"{prefix}.expert_used_count"))
    if arch.model_type == "mixtral":
        if config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
            raise UserError(
                "this llama GGUF with experts has a head size other than hidden/heads, which mlx-lm's mixtral cannot run"
            )
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    gate = next((t for t in tensors if t.name.endswith("mlp.switch_mlp.gate_proj.weight")), None)
    default_ffn = gate.shape[1] if gate is not None else None
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(metadata(reader, f"{prefix}.expert_feed_forward_length", default_ffn)),
        "decoder_sparse_step": 1,  # llama.cpp's qwen3moe has experts in every layer
        "mlp_only_layers": [],
        "norm_topk_prob": True,  # llama.cpp renormalizes the chosen experts' weights for qwen3moe
    }


def _gemma_config(reader: GGUFReader, arch: Architecture, config: dict, names: set[str]) -> dict[str, Any]:
    prefix = arch.gguf_arch
    scalar = query_pre_attn_scalar(
        prefix,
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["head_dim"],
    )
    out: dict[str, Any] = {"query_pre_attn_scalar": scalar}
    if prefix == "gemma2":
        if "lm_head.weight" in names:
            raise UserError(
                "this gemma2 GGUF has an output.weight tensor; mlx-lm's gemma2 ties the output to token_embd"
            )
        out["attn_logit_softcapping"] = float(
            metadata(reader, f"{prefix}.attn_logit_softcapping", GEMMA2_DEFAULT_ATTN_SOFTCAP)
        )
        out["final_logit_softcapping"] = float(
            metadata(reader, f"{prefix}.final_logit_softcapping", GEMMA2_DEFAULT_FINAL_SOFTCAP)
        )
        out["sliding_window"] = int(metadata(reader, f"{prefix}.attention.sliding_window", GEMMA2_DEFAULT_WINDOW))
        return out
    if float(metadata(reader, f"{prefix}.final_logit_softcapping", 0.0)):
        raise UserError("this gemma3 GGUF caps its final logits, which mlx-lm's gemma3_text cannot do")
    window = int(metadata(reader, f"{prefix}.attention.sliding_window", 0))
    out["rope_local_base_freq"] = GEMMA3_LOCAL_ROPE_BASE
    out["sliding_window_pattern"] = GEMMA3_SLIDING_PATTERN if window else 1  # no window: every layer global
    if window:
        out["sliding_window"] = window
    return out


def _phi3_config(reader: GGUFReader, config: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rope_dims = metadata(reader, "phi3.rope.dimension_count", None)
    if rope_dims is not None and int(rope_dims) != config["head_dim"]:
        out["partial_rotary_factor"] = int(rope_dims) / config["head_dim"]
    original = metadata(reader, "phi3.rope.scaling.original_context_length", None)
    if original is not None:
        out["original_max_position_embeddings"] = int(original)
    window = int(metadata(reader, "phi3.attention.sliding_window", 0))
    if window:
        out["sliding_window"] = window
    return out


def family_config(reader: GGUFReader, arch: Architecture, tensors: list[OutputTensor], config: dict) -> dict[str, Any]:
    """The family's own config.json entries (experts, post-norm Gemma details, Phi-3's partial RoPE)."""
    names = {t.name for t in tensors}
    if arch.experts:
        return _expert_config(reader, arch, tensors, config)
    if arch.model_type in ("gemma2", "gemma3_text"):
        return _gemma_config(reader, arch, config, names)
    if arch.model_type == "phi3":
        return _phi3_config(reader, config)
    return {}
