"""GGUF metadata -> config.json: the model's hyperparameters, RoPE scaling and quantization."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_config_families import family_config
from mlx_abliteration.io.gguf_families import Architecture
from mlx_abliteration.io.gguf_reader import metadata
from mlx_abliteration.io.gguf_tensors import GROUP_SIZE, OutputTensor

if TYPE_CHECKING:
    from gguf import GGUFReader


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
            bits_by_layer[layer] = by_name[f"{layer}.weight"].shape[-1] * 32 // (tensor.shape[-1] * GROUP_SIZE)
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
        if tensor.name.endswith(".weight") and len(tensor.shape) >= 2 and layer not in bits_by_layer:
            config[layer] = False
    return config


def build_config(
    reader: GGUFReader, arch: Architecture, tensors: list[OutputTensor], dtype: str, eos_ids: list[int]
) -> dict:
    prefix = arch.gguf_arch
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
    config.update(family_config(reader, arch, tensors, config))
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
