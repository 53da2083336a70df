"""Tiny random-weight models and tokenizers, built locally (tests, benchmarks).

Everything here writes real files: a byte-level BPE ``tokenizer.json`` trained
with ``tokenizers``, a ChatML chat template, ``config.json`` and safetensors
shards in the layout ``mlx_lm.load`` expects.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's reasoning switch: the generation prompt gets an empty, closed thinking block when
# enable_thinking is false; otherwise the model opens <think> itself.
QWEN3_THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
# DeepSeek-R1-style: the generation prompt always opens the thinking block.
FORCED_THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def set_chat_template(path: str | Path, template: str) -> None:
    """Replace the chat template of a tiny model's tokenizer (e.g. ``QWEN3_THINKING_TEMPLATE``)."""
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))


_CORPUS = [
    "How do I bake bread at home? Explain the steps.",
    "Write a poem about the sea and the wind.",
    "Tell me how to pick a lock or hack a computer.",
    "What is the capital of France? Paris is the capital.",
    "I'm sorry, but I can't assist with that request.",
    "Sure! Here is a detailed answer with numbers 0123456789.",
    "system user assistant You are a helpful assistant.",
]


def write_tiny_tokenizer(path: str | Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer and write its files; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 4,
    tie: bool = True,
) -> dict:
    """A config.json dict for a tiny model of a real mlx-lm architecture."""
    config = {
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": hidden_size * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "eos_token_id": None,
    }
    if arch == "qwen2":
        config["architectures"] = ["Qwen2ForCausalLM"]
    elif arch == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
    elif arch == "qwen3":
        config["architectures"] = ["Qwen3ForCausalLM"]
        config["head_dim"] = hidden_size // 4
    elif arch == "mixtral":
        config["architectures"] = ["MixtralForCausalLM"]
        config["num_local_experts"] = 2
        config["num_experts_per_tok"] = 2
    elif arch == "mistral":  # mlx-lm runs it as llama
        config["architectures"] = ["MistralForCausalLM"]
    elif arch == "qwen3_moe":
        config.update(
            architectures=["Qwen3MoeForCausalLM"],
            head_dim=hidden_size // 4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj, RoPE on part of each head
        config.update(
            architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.5, original_max_position_embeddings=1024
        )
    elif arch in ("gemma2", "gemma3_text"):  # post-norms, 1 + w norm gains, tied embeddings, sliding windows
        head_dim = hidden_size // 4
        config.update(head_dim=head_dim, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6, sliding_window=4)
        if arch == "gemma2":
            config["architectures"] = ["Gemma2ForCausalLM"]
        else:
            config.update(
                architectures=["Gemma3ForCausalLM"],
                rope_theta=1_000_000.0,
                rope_local_base_freq=10000.0,
                sliding_window_pattern=6,
            )
    elif arch == "gpt2":
        config = {
            "model_type": "gpt2",
            "n_ctx": 2048,
            "n_embd": hidden_size,
            "n_head": 4,
            "n_layer": num_layers,
            "n_positions": 2048,
            "layer_norm_epsilon": 1e-5,
            "vocab_size": vocab_size,
            "architectures": ["GPT2LMHeadModel"],
        }
    return config


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    tie: bool = True,
    dtype: str = "float32",
    bits: int | None = None,
    group_size: int = 32,
    num_shards: int = 1,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
    embedding_bits: int | None = None,
    vector_std: float = 0.0,
    overrides: dict | None = None,
) -> Path:
    """Write a random-weight model dir that ``mlx_lm.load`` opens.

    ``vector_std`` adds that much noise to vectors (norm gains, biases), which otherwise keep their
    initial values; ``overrides`` replaces config.json entries (e.g. the number of experts).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_abliteration.io.model_checks import model_classes

    path = Path(path)
    vocab = write_tiny_tokenizer(path)
    config = tiny_config(arch, vocab, hidden_size, num_layers, tie)
    config["eos_token_id"] = 2  # <|im_end|> is the third special token
    config.update(overrides or {})
    mx.random.seed(seed)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    # Larger-than-default init so a tiny random model has non-trivial logits.
    params = tree_flatten(model.parameters())
    new = [
        (
            k,
            mx.random.normal(v.shape) * 0.2
            if v.ndim > 1
            else v + mx.random.normal(v.shape) * vector_std
            if vector_std
            else v,
        )
        for k, v in params
    ]
    model.update(tree_unflatten(new))
    model.set_dtype(getattr(mx, dtype))
    if bits is not None:
        per_layer = {}
        if embedding_bits is not None and embedding_bits != bits:
            per_layer["model.embed_tokens"] = {"group_size": group_size, "bits": embedding_bits}

        def predicate(p, m):
            if not hasattr(m, "to_quantized"):
                return False
            if m.weight.shape[-1] % group_size:
                return False
            return per_layer.get(p, True)

        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **per_layer}
        config["quantization_config"] = config["quantization"]
    weights = dict(tree_flatten(model.parameters()))
    if hasattr(model, "sanitize") and tie:
        weights.pop("lm_head.weight", None)
    mx.eval(weights)
    _write_shards(path, weights, num_shards)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _write_shards(path: Path, weights: dict, num_shards: int) -> None:
    import mlx.core as mx

    names = sorted(weights)
    if num_shards <= 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    chunks = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: weights[k] for k in chunk}
        mx.save_safetensors(str(path / shard), part, metadata={"format": "mlx"})
        for k, v in part.items():
            weight_map[k] = shard
            total += v.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llama_config(
    hidden_size: int = 4096,
    num_layers: int = 32,
    intermediate_size: int = 14336,
    vocab_size: int = 128256,
    num_heads: int = 32,
    num_kv_heads: int = 8,
) -> dict:
    """A Llama config.json dict; the defaults are Llama-3-8B's shape."""
    config = tiny_config("llama", vocab_size, hidden_size, num_layers, tie=False)
    config.update(
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rope_theta=500000.0,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    return config


def build_synthetic_model(
    path: str | Path, config: dict, num_shards: int = 4, dtype: str = "bfloat16", seed: int = 0
) -> Path:
    """Write a random-weight model of any size with bounded memory.

    Weights are generated shard by shard (layer-contiguous, like published
    checkpoints), so peak memory is about one shard however large the model.
    Scales keep activations finite: N(0, 1/fan_in) for matrices, ones for norms.
    The tokenizer is the tiny trained one (its ids are valid for any vocab >= 384).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_abliteration.io.model_checks import model_classes

    path = Path(path)
    write_tiny_tokenizer(path)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy init: nothing allocated yet
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    del model
    mx.random.seed(seed)
    target = getattr(mx, dtype)
    chunks = _contiguous_chunks(shapes, num_shards)
    weight_map, total = {}, 0
    for i, names in enumerate(chunks):
        shard = "model.safetensors" if len(chunks) == 1 else f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        part = {name: _random_tensor(shapes[name], target) for name in names}
        mx.save_safetensors(str(path / shard), part, metadata={"format": "mlx"})
        total += sum(v.nbytes for v in part.values())
        weight_map.update({name: shard for name in names})
        del part
        mx.clear_cache()
    if len(chunks) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _random_tensor(shape, dtype):
    import mlx.core as mx

    if len(shape) == 1:
        return mx.ones(shape, dtype=dtype)
    out = (mx.random.normal(shape) * shape[-1] ** -0.5).astype(dtype)
    mx.eval(out)
    return out


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1, name
    return (0 if "embed" in name else 1 << 30), name


def _contiguous_chunks(shapes: dict, num_shards: int) -> list[list[str]]:
    """Names split in layer order into ``num_shards`` runs of about equal size."""
    import math

    names = sorted(shapes, key=_layer_key)
    sizes = [math.prod(shapes[n]) for n in names]
    budget = sum(sizes) / max(num_shards, 1)
    chunks, current, filled = [], [], 0.0
    for name, size in zip(names, sizes):
        if current and filled + size > budget * 1.05 and len(chunks) < num_shards - 1:
            chunks.append(current)
            current, filled = [], 0.0
        current.append(name)
        filled += size
    chunks.append(current)
    return chunks
