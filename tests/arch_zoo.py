"""A zoo of tiny random models, one per text architecture that mlx-lm runs.

Test helper (not a test file).  ``text_model_types()`` lists every
``mlx_lm.models`` module that defines ``Model`` + ``ModelArgs``;
``tiny_config`` gives a small config for each (generic defaults from the
``ModelArgs`` fields plus a per-arch override table); ``build_tiny_model_dir``
writes a model dir ``mlx_lm.load`` opens; ``residual_trace`` captures every
decoder layer's input/output hidden state on a real forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import math
import pkgutil
from functools import cache
from pathlib import Path
from typing import Any

import mlx_abliteration  # noqa: F401  (loads OpenBLAS before mlx.core)

VOCAB = 384
HIDDEN = 64

# Modules of mlx_lm.models that are helpers, not architectures.
_HELPER_MODULES = {
    "activations",
    "base",
    "bitlinear_layers",
    "cache",
    "gated_delta",
    "mla",
    "pipeline",
    "rope_utils",
    "ssm",
    "switch_layers",
}

# Model types that cannot be built/run as tiny text models (one-line reason).
UNBUILDABLE: dict[str, str] = {
    "bitnet": "BitLinear layers run only through a Metal kernel (no CPU path in mlx-lm)",
    "prism_hadamard_qwen35": "a pre-packed 2-bit Hadamard-rotated checkpoint format "
    "(needs a packed-module manifest), not a random-init architecture",
    "muse_spark": "attention uses a fused qk-norm+RoPE Metal kernel (mlx_lm.kernels); no CPU path",
    "phi3small": "the forward pass segfaults in the MLX CPU backend (block-sparse attention "
    "layers), which would kill the test process",
    "olmo": "imports the external `ai2-olmo` package (hf_olmo), which is not installed",
}

# Archs whose decoder layers carry several parallel residual streams: the
# traced hidden states keep the stream axis (gemma3n AltUp: [n, B, T, H];
# deepseek_v41 hyper-connections: [B, T, n, H]).
MULTI_STREAM: set[str] = {"gemma3n", "deepseek_v41"}

# Archs that build and run, but whose forward pass never calls the decoder
# layer modules (it inlines their submodules), so layer wrappers see nothing.
NOT_TRACEABLE: dict[str, str] = {
    "iquestloopcoder": "Model.__call__ runs each layer's submodules inline, twice (loop_num=2); "
    "layers are never called",
}

# ---------------------------------------------------------------------------
# configs

# Generic values by ModelArgs field name (applied to every field the dataclass
# has, required or not, so default-heavy archs also shrink).
_GENERIC: dict[str, Any] = {
    # widths
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "n_embd": HIDDEN,
    "hidden_dim": HIDDEN,
    "model_dim": HIDDEN,
    "dim": HIDDEN,
    "block_dim": HIDDEN,
    # depth
    "num_hidden_layers": 4,
    "n_layers": 4,
    "n_layer": 4,
    "num_layers": 4,
    "num_transformer_layers": 4,
    # ffn
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "n_inner": 128,
    "ff_intermediate_size": 128,
    "mlp_hidden_size": 128,
    "block_ff_dim": 128,
    "intermediate_size_mlp": 128,
    "ffn_dim": 128,
    "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    # heads
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    # vocab / positions
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "n_positions": 512,
    "n_ctx": 512,
    "block_size": 512,
    "model_max_length": 512,
    "seq_length": 512,
    # norms
    "rms_norm_eps": 1e-5,
    "layer_norm_eps": 1e-5,
    "layer_norm_epsilon": 1e-5,
    "norm_eps": 1e-5,
    "layernorm_epsilon": 1e-5,
    # rope
    "rope_theta": 10000.0,
    # MoE
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_top_k": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "num_shared_expert": 1,
    "moe_num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    # MLA
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # misc
    "sliding_window": 4,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

# Per-arch overrides (applied after the generic values).  Values may be
# callables taking the config built so far.
_L4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_YARN = {
    "type": "yarn",
    "factor": 4.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 128,
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    "Klear": {"mlp_only_layers": [0], "decoder_sparse_step": 1},
    "afm7": {"num_kv_reuse_layers": 2, "hidden_dim_scale_factor": 2.0},
    "afmoe": {"layer_types": _L4, "num_dense_layers": 1},
    "baichuan_m1": {"sliding_window_layers": [0, 2], "conv_window": 2},
    "bailing_moe_linear": {"layer_group_size": 2, "group_norm_size": 1, "first_k_dense_replace": 1},
    "bitnet": {},
    "dbrx": {
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
    },
    "deepseek_v2": {"rope_scaling": _YARN, "n_routed_experts": 4, "num_experts_per_tok": 2},
    "exaone4": {
        "rope_scaling": None,
        "sliding_window_pattern": "LLGL",
        # transformers' config validator wants the expanded list too
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    },
    "exaone_moe": {"layer_types": _L4, "is_moe_layer": [False, True, True, True], "rope_scaling": None},
    "gemma3_text": {"sliding_window_pattern": 2, "query_pre_attn_scalar": 16, "rope_scaling": None},
    "gemma4_text": {
        "global_head_dim": 32,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 16,
        "num_kv_shared_layers": 2,
        "sliding_window_pattern": 2,
        "num_global_key_value_heads": 1,
    },
    "glm_moe_dsa": {
        "index_head_dim": 16,
        "index_n_heads": 2,
        "index_topk": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "gpt_neox": {"rotary_emb_base": 10000, "rotary_pct": 0.25},
    "gptj": {"rotary_dim": 8},
    "granitemoehybrid": {
        "mamba_expand": 2,
        "layer_types": ["mamba", "attention", "mamba", "attention"],
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
    },
    "granite": {
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
    },
    "granitemoe": {
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
    },
    "hunyuan": {
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "use_cla": True,
        "cla_share_factor": 2,
        "moe_intermediate_size": 32,
    },
    "hunyuan_v1_dense": {"use_qk_norm": True},
    "jamba": {
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
    },
    "kimi_linear": {
        "linear_attn_config": {"num_heads": 4, "head_dim": 16, "kda_layers": [1, 3], "short_conv_kernel_size": 4},
        "rope_scaling": None,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "num_experts_per_token": 2,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "lfm2": {
        "conv_L_cache": 3,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "conv_bias": False,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "lfm2_moe": {
        "conv_L_cache": 3,
        "num_dense_layers": 1,
        "conv_bias": False,
        "use_expert_bias": True,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "llama": {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
    "llama4_text": {
        "no_rope_layers": [1, 1, 1, 0],
        "use_qk_norm": True,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 4,
    },
    "longcat_flash": {
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "zero_expert_num": 2,
        "num_layers": 2,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "rope_scaling": None,
    },
    "longcat_flash_ngram": {
        "zero_expert_num": 2,
        "num_layers": 2,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "rope_scaling": None,
    },
    "mamba": {"conv_kernel": 4, "state_size": 16, "time_step_rank": 8, "use_conv_bias": True},
    "mamba2": {
        "conv_kernel": 4,
        "n_groups": 1,
        "time_step_limit": [0.0, 1e9],
        "state_size": 16,
        "num_heads": 8,
        "head_dim": 16,
        "time_step_rank": "auto",
        "use_conv_bias": True,
    },
    "mellum": {
        "layer_types": _L4,
        "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0}, "full_attention": {"rope_theta": 10000.0}},
    },
    "mimo_v2_flash": {
        "hybrid_layer_pattern": [0, 1, 0, 1],
        "moe_layer_freq": [0, 1, 1, 1],
        "add_swa_attention_sink_bias": True,
        "sliding_window_size": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "swa_rope_theta": 10000.0,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "v_head_dim": 16,
        "swa_head_dim": 16,
        "swa_v_head_dim": 16,
        "partial_rotary_factor": 0.5,
    },
    "minicpm": {"dim_model_base": 32, "scale_depth": 1.4, "scale_emb": 4.0},
    "minicpm3": {
        "dim_model_base": 32,
        "scale_depth": 1.4,
        "scale_emb": 4.0,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0] * 4,
            "short_factor": [1.0] * 4,
            "original_max_position_embeddings": 512,
        },
    },
    "minimax": {"rotary_dim": 8},
    "ministral3": {
        "rope_parameters": {
            "rope_theta": 10000.0,
            "rope_type": "default",
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 128,
        }
    },
    "mistral4": {
        "rope_parameters": {
            "rope_theta": 10000.0,
            "rope_type": "default",
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 128,
        }
    },
    "phixtral": {"rotary_dim": 8},
    "nemotron": {"hidden_act": "relu2", "partial_rotary_factor": 0.5},
    "nemotron-nas": {
        "block_configs": [
            {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}},
            {"attention": {"no_op": True}, "ffn": {"ffn_mult": 1.5}},
            {"attention": {"replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}},
            {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}},
        ]
    },
    "nemotron_h": {
        "hybrid_override_pattern": ["M", "*", "-", "E"],
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "use_conv_bias": True,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    },
    "olmo3": {"layer_types": _L4},
    "olmo_hybrid": {
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "linear_allow_neg_eigval": True,
    },
    "openelm": {
        "head_dim": 16,
        "ffn_dim_divisor": 16,
        "num_query_heads": [4, 4, 2, 2],
        "num_kv_heads": [2, 2, 1, 1],
        "ffn_multipliers": [1.0, 1.5, 2.0, 2.5],
        "model_dim": HIDDEN,
        "num_transformer_layers": 4,
    },
    "phi3small": {
        "dense_attention_every_n_layers": 2,
        "gegelu_limit": 20.0,
        "ff_intermediate_size": 128,
        "blocksparse_block_size": 32,
        "blocksparse_num_local_blocks": 2,
        "blocksparse_vert_stride": 2,
    },
    "plamo": {"n_shared_head": 2},
    "qwen": {"kv_channels": 16, "intermediate_size": 256},
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": [0], "rope_scaling": None},
    "qwen3_next": {
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "full_attention_interval": 2,
        "rope_scaling": None,
    },
    "recurrent_gemma": {
        "conv1d_width": 4,
        "logits_soft_cap": 30.0,
        "attention_window_size": 4,
        "block_types": ["recurrent", "recurrent", "attention"],
    },
    "spark2_5": {
        "layer_types": _L4,
        "rope_parameters": {
            "sliding_attention": {"rope_theta": 10000.0},
            "full_attention": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
    },
    "gemma3n:text": {
        "model_type": "gemma3n_text",
        "num_kv_shared_layers": 2,
        "vocab_size_per_layer_input": VOCAB,
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": 30.0,
        "layer_types": _L4,
        "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
        "hidden_size_per_layer_input": 16,
        "altup_num_inputs": 4,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "altup_active_idx": 0,
        "laurel_rank": 8,
    },
    "gemma4": {
        "text_config": lambda c: {
            **c["text_config"],
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
        }
    },
    "kimi_k3:text": {
        "linear_attn_config": {"num_heads": 4, "head_dim": 16, "kda_layers": [1, 3], "short_conv_kernel_size": 4},
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "num_experts": 4,
        "num_experts_per_token": 2,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "kimi_vl:text": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "llama4:text": {
        "interleave_moe_layer_step": 2,
        "no_rope_layers": [1, 1, 1, 0],
        "use_qk_norm": True,
        "attention_chunk_size": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
    },
    "minimax_m3_vl:text": {
        "dense_intermediate_size": 128,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_layer_freq": [0, 1, 1, 1],
        "rotary_dim": 8,
    },
    "muse_spark:text": {
        "num_shared_experts": 0,
        "post_norm_eps": 1e-8,
        "rope_parameters": {"rope_theta": 10000.0},
        "layer_rope_theta": [10000.0, 0, 10000.0, 0],
        "layer_types": _L4,
        "final_logit_softcapping": 30.0,
        "output_multiplier": 1.0,
        "moe_hidden_size": 32,
        "moe_intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen3_5:text": {
        "model_type": "qwen3_5_text",
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "rope_parameters": {
            "type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    },
    "qwen3_5_moe:text": {
        "model_type": "qwen3_5_moe_text",
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 32,
        "moe_intermediate_size": 32,
        "rope_parameters": {
            "type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    },
    "prism_hadamard_qwen35:text": {
        "model_type": "qwen3_5_text",
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
    },
    "step3p5": {
        "num_attention_groups": 2,
        "rope_scaling": None,
        "layer_types": _L4,
        "moe_num_experts": 4,
        "moe_top_k": 2,
        "moe_intermediate_size": 32,
        "share_expert_dim": 32,
        "moe_layers_enum": "1,2,3",
        "attention_other_setting": {"num_attention_heads": 2, "num_attention_groups": 2},
    },
}


# Multimodal / nested wrappers: model_type -> where the text config comes from:
# either another model type (its tiny_config is reused) or "module:Class" of the
# text args dataclass (generic values + _OVERRIDES["<model_type>:text"]).
_WRAPPERS: dict[str, str] = {
    "gemma3": "gemma3_text",
    "gemma3n": "gemma3n:TextConfig",
    "gemma4": "gemma4_text",
    "kimi_k25": "deepseek_v3",
    "kimi_k3": "kimi_k3:TextArgs",
    "kimi_vl": "kimi_vl:TextArgs",
    "lfm2-vl": "lfm2",
    "llama4": "llama4:TextArgs",
    "minimax_m3_vl": "minimax_m3_vl:TextArgs",
    "mistral3": "ministral3",
    "muse_spark": "muse_spark:TextArgs",
    "pixtral": "llama",
    "prism_hadamard_qwen35": "qwen3_5:TextModelArgs",
    "qwen2_vl": "qwen2",
    "qwen3_5": "qwen3_5:TextModelArgs",
    "qwen3_5_moe": "qwen3_5:TextModelArgs",
    "qwen3_vl": "qwen3",
    "qwen3_vl_moe": "qwen3_moe",
}


def _module(model_type: str):
    return importlib.import_module(f"mlx_lm.models.{model_type}")


@cache
def text_model_types() -> list[str]:
    """Every mlx_lm.models module with ``Model`` and ``ModelArgs`` (text decoders)."""
    import mlx_lm.models as models

    out = []
    for info in pkgutil.iter_modules(models.__path__):
        name = info.name
        if name in _HELPER_MODULES or name.startswith("_"):
            continue
        if name in UNBUILDABLE:
            out.append(name)
            continue
        try:
            mod = _module(name)
        except BaseException:  # noqa: BLE001  (olmo calls sys.exit on import)
            out.append(name)
            continue
        if hasattr(mod, "Model") and hasattr(mod, "ModelArgs"):
            out.append(name)
    return sorted(out)


def _generic_config(model_type: str, args_cls=None) -> dict:
    if args_cls is None:
        args_cls = _module(model_type).ModelArgs
    cfg: dict[str, Any] = {"model_type": model_type}
    for f in dataclasses.fields(args_cls):
        name = f.name
        if name == "model_type":
            continue
        if name in _GENERIC:
            cfg[name] = copy.deepcopy(_GENERIC[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            cfg[name] = _guess(name)
    return cfg


def _guess(name: str) -> Any:
    """A value for a required field the generic table does not know."""
    n = name.lower()
    if "rope" in n:
        return None
    if n.startswith(("use_", "add_", "is_")) or n.endswith("_bias"):
        return False
    if "eps" in n:
        return 1e-5
    if "theta" in n:
        return 10000.0
    if "rank" in n:
        return 8
    if "size" in n or "dim" in n:
        return 32
    if "factor" in n or "multiplier" in n or "scal" in n:
        return 1.0
    return None


def tiny_config(model_type: str) -> dict:
    """config.json dict for a tiny model of ``model_type``."""
    cfg = _generic_config(model_type)
    if model_type in _WRAPPERS:
        src = _WRAPPERS[model_type]
        if ":" in src:
            mod, cls = src.split(":")
            text = _generic_config(mod, getattr(_module(mod), cls))
            _apply(text, _OVERRIDES.get(f"{model_type}:text", {}))
        else:
            text = tiny_config(src)
            text.pop("eos_token_id", None)
        cfg["text_config"] = text
    _apply(cfg, _OVERRIDES.get(model_type, {}))
    cfg.setdefault("vocab_size", VOCAB)
    cfg["eos_token_id"] = 2  # <|im_end|>
    return cfg


def _apply(cfg: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        cfg[key] = value(cfg) if callable(value) else copy.deepcopy(value)


# ---------------------------------------------------------------------------
# building


def _randomize(model, seed: int) -> None:
    """Random weights with O(1) activations: matrices ~ N(0, 1/fan_in)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    new = []
    for name, v in tree_flatten(model.parameters()):
        if not mx.issubdtype(v.dtype, mx.floating):
            new.append((name, v))
            continue
        leaf = name.rsplit(".", 1)[-1]
        if v.ndim >= 2 and v.size > 1:
            if "conv" in name and v.ndim == 3:
                fan_in = v.shape[1] * v.shape[2]
            else:
                fan_in = v.shape[-1]
            new.append((name, mx.random.normal(v.shape) / math.sqrt(max(fan_in, 1))))
        elif leaf == "bias" or leaf.endswith("_bias"):
            new.append((name, 0.1 * mx.random.normal(v.shape)))
        else:
            # norm gains, SSM constants (A_log, D, dt_bias), scales: keep the
            # model's own init and jitter it a little.
            new.append((name, v + 0.1 * mx.random.normal(v.shape)))
    model.update(tree_unflatten(new))


def build_tiny_model(
    model_type: str, dtype: str = "float32", quantize_bits: int | None = None, seed: int = 0, group_size: int = 32
):
    """(model, config) in memory: the same model ``build_tiny_model_dir`` saves."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    if model_type in UNBUILDABLE:
        raise ValueError(f"{model_type} is unbuildable: {UNBUILDABLE[model_type]}")
    config = tiny_config(model_type)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)  # some archs draw their own init (A_log, ...) at construction
    model = model_class(args_class.from_dict(config))
    _randomize(model, seed)
    if hasattr(model, "sanitize"):
        # Make the in-memory model what `mlx_lm.load` will see (e.g. baichuan_m1
        # normalizes lm_head rows in sanitize).
        weights = model.sanitize(dict(tree_flatten(model.parameters())))
        model.load_weights(list(weights.items()), strict=False)
    model.set_dtype(getattr(mx, dtype))
    if quantize_bits is not None:

        def predicate(p, m):
            return hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0

        nn.quantize(model, group_size=group_size, bits=quantize_bits, class_predicate=predicate)
        config["quantization"] = {"group_size": group_size, "bits": quantize_bits, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])
    mx.eval(model.parameters())
    return model, config


def build_tiny_model_dir(
    model_type: str, path, dtype: str = "float32", quantize_bits: int | None = None, seed: int = 0
) -> Path:
    """Write config.json, model.safetensors and a tokenizer; returns ``path``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tests.support.tiny_models import write_tiny_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, config = build_tiny_model(model_type, dtype, quantize_bits, seed)
    write_tiny_tokenizer(path, VOCAB)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ---------------------------------------------------------------------------
# tracing


def _slots(model) -> list[tuple[list, int]]:
    """For each decoder layer, the (list object, index) that holds it.

    ``model.layers`` is often a property returning a fresh list (a slice, or a
    concatenation like afm7's ``layers + kv_reuse_layers``); the forward pass
    reads the lists stored in the module tree, so those are what we patch.
    """
    layers = decoder_layer_list(model)
    where: dict[int, tuple[list, int]] = {}
    seen: set[int] = set()
    stack = [model]
    while stack:
        mod = stack.pop()
        if id(mod) in seen or not isinstance(mod, dict):
            continue
        seen.add(id(mod))
        for value in mod.values():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    where.setdefault(id(item), (value, i))
                    stack.append(item)
            elif isinstance(value, dict):
                stack.append(value)
    missing = [i for i, layer in enumerate(layers) if id(layer) not in where]
    if missing:
        raise RuntimeError(f"decoder layers {missing} are not stored in a list of the module tree")
    return [where[id(layer)] for layer in layers]


def decoder_layer_list(model) -> list:
    """The decoder layers of ``model``, in forward order."""
    return list(model.layers)


class _Tap:
    """Thin wrapper around a decoder layer that records its input/output."""

    _HIDDEN_KWARGS = ("x", "hidden_states", "h", "hidden_state", "inputs", "input", "hidden")

    def __init__(self, layer, records: list):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_records", records)

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def _hidden_in(self, args, kwargs):
        try:
            bound = inspect.signature(self._layer.__call__).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = dict(kwargs)
        for name in self._HIDDEN_KWARGS:  # e.g. talkie's block(e_x, x, mask, cache)
            if name in bound:
                return bound[name]
        return args[0] if args else next(iter(kwargs.values()))

    def __call__(self, *args, **kwargs):
        h_in = self._hidden_in(args, kwargs)
        out = self._layer(*args, **kwargs)
        h_out = out[0] if isinstance(out, tuple) else out
        self._records.append((h_in, h_out))
        return out


def residual_trace(model, token_ids):
    """``(embed_out, [(h_in, h_out) per decoder layer])`` from ``model(ids)``."""
    import mlx.core as mx

    slots = _slots(model)
    originals = [lst[i] for lst, i in slots]
    per_layer: list[list] = [[] for _ in slots]
    try:
        for (lst, i), layer, recs in zip(slots, originals, per_layer):
            lst[i] = _Tap(layer, recs)
        logits = model(mx.array([list(token_ids)]))
        mx.eval(logits)
    finally:
        for (lst, i), layer in zip(slots, originals):
            lst[i] = layer
    missing = [i for i, recs in enumerate(per_layer) if not recs]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called")
    trace = [recs[0] for recs in per_layer]
    mx.eval(trace)
    return trace[0][0], trace
