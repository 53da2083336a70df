"""The model families GGUF import and export know: llama.cpp's architecture and tensor names against mlx-lm's.

One ``Architecture`` per mlx-lm model type. Import picks it from ``general.architecture``
(a ``llama`` file with experts is Mixtral); export picks it from config.json's ``model_type``.
Names follow the ``gguf`` package's ``TENSOR_NAMES`` and llama.cpp's converter
(``convert_hf_to_gguf.py``): what it calls a tensor for each family, and how it changes the
values on the way (the Llama Q/K row permutation, Gemma's ``1 + w`` norms stored with the 1 added).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Block tensors shared by the plain decoders: llama.cpp name -> mlx-lm module under model.layers.N
_BASE = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3, gemma3: RMSNorm of each head's queries and keys
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",  # the pre-MLP norm (Hugging Face's name for it)
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _experts(block: str) -> dict[str, str]:
    """A mixture-of-experts MLP: the router and the experts stacked into one 3-D tensor each."""
    return {
        "ffn_gate_inp": f"{block}.gate",
        "ffn_gate_exps": f"{block}.switch_mlp.gate_proj",
        "ffn_up_exps": f"{block}.switch_mlp.up_proj",
        "ffn_down_exps": f"{block}.switch_mlp.down_proj",
    }


_MIXTRAL = {k: v for k, v in _BASE.items() if not k.startswith(("ffn_gate", "ffn_up", "ffn_down"))}
_MIXTRAL.update(_experts("block_sparse_moe"))
_QWEN3MOE = {**_BASE, **_experts("mlp")}  # dense ffn_* for layers a config keeps dense
# Gemma 2/3: a norm after each branch (post-norm) besides the one before it
_GEMMA = {
    **_BASE,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3: fused Q/K/V and fused gate/up (llama.cpp's ffn_up holds [gate; up], as mlx-lm's gate_up_proj)
_PHI3 = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # mlx-lm's (config.json)
    hf_class: str
    gguf_arch: str  # general.architecture, and the prefix of its metadata keys
    interleaved_rope: bool  # llama.cpp permutes Q/K rows for its interleaved ("normal") RoPE
    layer_names: Mapping[str, str] = field(default_factory=lambda: _BASE)
    norm_shift: float = 0.0  # added to every norm weight in the GGUF (Gemma's 1 + w convention)
    experts: bool = False


_LLAMA = Architecture("llama", "LlamaForCausalLM", "llama", interleaved_rope=True)

ARCHITECTURES = {
    arch.model_type: arch
    for arch in (
        _LLAMA,
        Architecture("mixtral", "MixtralForCausalLM", "llama", True, _MIXTRAL, experts=True),
        Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", interleaved_rope=False),
        Architecture("qwen3", "Qwen3ForCausalLM", "qwen3", interleaved_rope=False),
        Architecture("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", False, _QWEN3MOE, experts=True),
        Architecture("phi3", "Phi3ForCausalLM", "phi3", False, _PHI3),
        Architecture("gemma2", "Gemma2ForCausalLM", "gemma2", False, _GEMMA, norm_shift=1.0),
        Architecture("gemma3_text", "Gemma3ForCausalLM", "gemma3", False, _GEMMA, norm_shift=1.0),
    )
}
# model types mlx-lm runs with another family's code: exported as that family
EXPORT_ALIASES = {"mistral": _LLAMA}
GGUF_ARCHITECTURES = sorted({arch.gguf_arch for arch in ARCHITECTURES.values()})
EXPORT_MODEL_TYPES = (*ARCHITECTURES, *EXPORT_ALIASES)


def export_architecture(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type) or EXPORT_ALIASES.get(model_type)


def import_architecture(gguf_arch: str, expert_count: int) -> Architecture | None:
    """The family of a file: ``general.architecture``, and for ``llama`` whether it has experts."""
    candidates = [a for a in ARCHITECTURES.values() if a.gguf_arch == gguf_arch]
    if len(candidates) > 1:
        candidates = [a for a in candidates if a.experts == (expert_count > 0)]
    return candidates[0] if candidates else None


def mlx_tensor_name(gguf_name: str, arch: Architecture = _LLAMA) -> str | None:
    """mlx-lm parameter name for a GGUF tensor name; None if the name is unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES and parts[1] in ("weight", "bias"):
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in arch.layer_names:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{arch.layer_names[parts[2]]}.{parts[3]}"
    return None


def gguf_tensor_name(mlx_name: str, arch: Architecture = _LLAMA) -> str | None:
    """llama.cpp's name for an mlx-lm parameter name (the inverse of ``mlx_tensor_name``); None if unknown."""
    module, _, leaf = mlx_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    for gguf_module, mlx_module in GLOBAL_NAMES.items():
        if module == mlx_module:
            return f"{gguf_module}.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf_module, mlx_module in arch.layer_names.items():
            if parts[3] == mlx_module:
                return f"blk.{parts[2]}.{gguf_module}.{leaf}"
    return None


def is_norm(mlx_name: str) -> bool:
    """A norm's gain vector (the tensors a ``norm_shift`` applies to)."""
    return mlx_name.endswith("norm.weight")
