"""GGUF import on synthetic GGUF files written here with the gguf package's own writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mlx_abliteration.errors import UserError
from mlx_abliteration.io import gguf_tensors
from mlx_abliteration.io.gguf import convert_gguf, convert_gguf_cached
from tests.support.patching import patch_everywhere
from tests.support.tiny_models import CHATML_TEMPLATE, write_tiny_tokenizer

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 2  # 256: K-quant rows hold whole super-blocks
HEAD_DIM = HIDDEN // HEADS
REPO = Path(__file__).resolve().parent.parent

HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


# --------------------------------------------------------------------------- synthetic GGUF files


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """tokens, merges and token types of the tiny trained BPE tokenizer (special tokens are control)."""
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    data = json.loads((path / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = {a["id"] for a in data["added_tokens"]}
    types = [3 if i in specials else 1 for i in range(len(tokens))]
    return {"tokens": tokens, "merges": merges, "types": types, "file": path / "tokenizer.json"}


def hf_weights(arch: str, tie: bool, vocab_size: int, seed: int = 0, llama_bias: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout and mlx-lm names."""
    rng = np.random.default_rng(seed)
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (FFN, HIDDEN),
        "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
    }
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab_size, HIDDEN))}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for module, shape in shapes.items():
            weights[f"{prefix}.{module}.weight"] = rng.normal(0, 0.1, shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{prefix}.{norm}.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        biased = ("q_proj", "k_proj", "v_proj") if arch == "qwen2" else ("q_proj", "k_proj", "v_proj", "o_proj")
        if arch == "qwen2" or llama_bias:
            for proj in biased:
                weights[f"{prefix}.self_attn.{proj}.bias"] = rng.normal(0, 0.1, shapes[f"self_attn.{proj}"][0])
    weights["model.norm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
    if not tie:
        weights["lm_head.weight"] = rng.normal(0, 0.1, (vocab_size, HIDDEN))
    return {k: v.astype(np.float32) for k, v in weights.items()}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers."):
        module = ".".join(parts[3:-1])
        return f"blk.{parts[2]}.{HF_TO_GGUF_LAYER[module]}.{parts[-1]}"
    return (
        {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[".".join(parts[:-1])]
        + "."
        + parts[-1]
    )


def llama_cpp_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The Q/K row permutation llama.cpp's converter applies for llama (interleaved RoPE pairs)."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def random_k_quant(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    """Valid random K-quant blocks (the gguf package cannot quantize K-quants)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 4e-3, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., -2:] = scale[..., 0:2]  # d is the last field
    else:
        raw[..., 0:4] = scale  # d and dmin lead the block
    return raw.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype: Q, seed: int) -> np.ndarray:
    if qtype in (Q.Q4_K, Q.Q6_K):
        return random_k_quant(*values.shape, qtype, seed)
    return gguf.quants.quantize(values, qtype)


def write_gguf(
    path: Path,
    vocab: dict,
    arch: str = "llama",
    tie: bool = True,
    types: dict[str, Q] | None = None,
    default_type: Q = Q.F32,
    pre: str = "default",
    extra: callable = None,
    llama_bias: bool = False,
) -> dict[str, np.ndarray]:
    """Write a GGUF model file; returns the stored tensors' values in Hugging Face layout (float32)."""
    weights = hf_weights(arch, tie, len(vocab["tokens"]), llama_bias=llama_bias)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if "scores" in vocab:  # a SentencePiece vocabulary
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(vocab["scores"])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(vocab["merges"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHATML_TEMPLATE)
    if extra:
        extra(writer)
    stored = {}
    for seed, (name, values) in enumerate(weights.items()):
        qtype = (types or {}).get(name.rsplit(".", 2)[-2] if "layers" in name else name.split(".")[-2], default_type)
        if values.ndim == 1:
            qtype = Q.F32
        raw = encode_tensor(values, qtype, seed)
        stored[name] = gguf.quants.dequantize(raw, qtype).reshape(values.shape).astype(np.float32)
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(name.split(".")[-2])
        if arch == "llama" and heads:
            raw = llama_cpp_permute(raw, heads)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name(name), raw)
        else:
            writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def load_safetensors(model_dir: Path) -> dict:
    import mlx.core as mx

    out = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        out.update(mx.load(str(file)))
    return out


def as_f32(array) -> np.ndarray:
    import mlx.core as mx

    return np.array(array.astype(mx.float32))


def assert_no_leftovers(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if name in p.name]
    assert leftovers == [], leftovers


# --------------------------------------------------------------------------- quantized path


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_q4_q8_tensors_stay_affine_quantized_and_match_gguf_dequantize(tmp_path, vocab, dtype):
    import mlx.core as mx

    types = {
        "embed_tokens": Q.Q8_0,
        "q_proj": Q.Q4_0,
        "k_proj": Q.Q4_0,
        "o_proj": Q.Q4_1,
        "down_proj": Q.Q4_1,
        "v_proj": Q.Q4_0,
        "gate_proj": Q.Q4_1,
        "up_proj": Q.Q4_0,
    }
    stored = write_gguf(tmp_path / "m.gguf", vocab, "llama", tie=True, types=types)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype=dtype)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert config["tie_word_embeddings"] is True and config["rope_traditional"] is False
    weights = load_safetensors(out)
    assert "lm_head.weight" not in weights
    for name, expected in stored.items():
        if expected.ndim == 1:
            assert weights[name].dtype == getattr(mx, dtype)
            continue
        stem = name.removesuffix(".weight")
        bits = 8 if "embed" in name else 4
        assert weights[name].dtype == mx.uint32 and weights[f"{stem}.scales"].dtype == getattr(mx, dtype)
        got = mx.dequantize(
            weights[name],
            weights[f"{stem}.scales"].astype(mx.float32),
            weights[f"{stem}.biases"].astype(mx.float32),
            group_size=32,
            bits=bits,
        )
        if dtype == "float16":  # GGUF block scales are float16: the conversion is exact
            np.testing.assert_array_equal(np.array(got), expected, err_msg=name)
        else:
            np.testing.assert_allclose(np.array(got), expected, atol=0.02 * np.abs(expected).max(), err_msg=name)


def test_mixed_file_keeps_native_quants_and_marks_dequantized_layers(tmp_path, vocab):
    """A Q4_0 file whose output matrix is Q6_K (common in llama.cpp quants)."""
    types = {
        "q_proj": Q.Q4_0,
        "k_proj": Q.Q4_0,
        "v_proj": Q.Q4_0,
        "o_proj": Q.Q4_0,
        "gate_proj": Q.Q4_0,
        "up_proj": Q.Q4_0,
        "down_proj": Q.Q4_0,
        "embed_tokens": Q.Q8_0,
        "lm_head": Q.Q6_K,
    }
    write_gguf(tmp_path / "m.gguf", vocab, "llama", tie=False, types=types)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["lm_head"] is False and quant["model.embed_tokens"]["bits"] == 8
    import mlx_lm

    model, _ = mlx_lm.load(str(out), lazy=True)
    assert type(model.lm_head).__name__ == "Linear"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


# --------------------------------------------------------------------------- dequantized path


def test_k_quants_and_floats_are_dequantized_with_gguf(tmp_path, vocab):
    import mlx.core as mx

    types = {
        "q_proj": Q.Q4_K,
        "k_proj": Q.Q6_K,
        "v_proj": Q.F16,
        "o_proj": Q.Q4_K,
        "down_proj": Q.Q6_K,
        "up_proj": Q.BF16,
        "gate_proj": Q.Q5_0,
        "embed_tokens": Q.Q4_K,
        "lm_head": Q.Q6_K,
    }
    stored = write_gguf(tmp_path / "m.gguf", vocab, "qwen2", tie=False, types=types)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["tie_word_embeddings"] is False
    weights = load_safetensors(out)
    assert set(weights) == set(stored)
    for name, expected in stored.items():
        assert weights[name].dtype == mx.bfloat16, name
        expected_bf16 = np.array(mx.array(expected).astype(mx.bfloat16).astype(mx.float32))
        np.testing.assert_array_equal(as_f32(weights[name]), expected_bf16, err_msg=name)


def test_bfloat16_rounding_matches_mlx():
    import mlx.core as mx

    values = np.random.default_rng(0).normal(0, 3, 4096).astype(np.float32)
    values[:6] = [0.0, -0.0, 1e-40, 3.3895314e38, np.inf, -np.inf]
    bits = gguf_tensors.to_bfloat16_bits(values)
    np.testing.assert_array_equal(bits, np.array(mx.array(values).astype(mx.bfloat16).view(mx.uint16)))
    nan_bits = gguf_tensors.to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(np.array(mx.array(nan_bits).view(mx.bfloat16).astype(mx.float32))).all()


# --------------------------------------------------------------------------- whole model semantics


@pytest.mark.parametrize(
    "arch,tie,llama_bias", [("llama", True, False), ("llama", False, True), ("qwen2", False, False)]
)
def test_converted_model_computes_the_same_logits_as_the_source(tmp_path, vocab, arch, tie, llama_bias):
    """Names, config and (for llama) the Q/K un-permutation, checked through a forward pass."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    from mlx_abliteration.io.model_io import load_model

    stored = write_gguf(tmp_path / "m.gguf", vocab, arch, tie=tie, default_type=Q.F32, llama_bias=llama_bias)
    # float32 compute on every device (the CPU's default; GPUs would keep the
    # stored float16): the check is of names, config and un-permutation.
    model, _, _ = load_model(
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16"), compute_dtype=mx.float32
    )

    config = {
        "model_type": arch,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab["tokens"]),
        "tie_word_embeddings": tie,
        "rope_theta": 10000.0,
        "attention_bias": llama_bias,
    }
    model_class, args_class = _get_classes(config)
    reference = model_class(args_class.from_dict(config))
    reference.load_weights([(k, mx.array(v).astype(mx.float16).astype(mx.float32)) for k, v in stored.items()])

    tokens = mx.array([[5, 17, 99, 230, 8, 42, 300, 7]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_chat_template_match_the_source_vocabulary(tmp_path, vocab):
    import jinja2
    from mlx_lm import load
    from tokenizers import Tokenizer

    # llama: transformers swaps in its own Qwen2Tokenizer (Qwen's regex) for model_type qwen2.
    write_gguf(tmp_path / "m.gguf", vocab, "llama")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    _, tokenizer = load(str(out), lazy=True)
    source = Tokenizer.from_file(str(vocab["file"]))
    for text in [
        "How do I bake bread at home?",
        "I'm sorry, 0123 numbers!\n\n  spaces",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert tokenizer.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False).ids

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert list(ids) == source.encode(rendered, add_special_tokens=False).ids
    assert tokenizer.eos_token == "<|im_end|>" and 2 in tokenizer.eos_token_ids
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("system\n")


@pytest.mark.parametrize(
    "pre,pieces",
    [
        ("default", ["Hello", "Ġ12345", "Ġwo", "'s"]),
        ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġwo", "'s"]),
        ("llama-bpe", ["Hello", "Ġ", "123", "45", "Ġwo", "'s"]),
        ("qwen2", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġwo", "'s"]),
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path, vocab, pre, pieces):
    from mlx_abliteration.io.gguf_tokenizer import build_tokenizer

    write_gguf(tmp_path / "m.gguf", vocab, "llama", pre=pre)
    tokenizer = build_tokenizer(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "m.gguf")
    assert [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("Hello 12345 wo's")] == pieces
    assert (tokenizer.normalizer is not None) == (pre == "qwen2")  # Qwen2 normalizes to NFC


def test_unknown_pre_tokenizer_is_a_user_error(tmp_path, vocab):
    write_gguf(tmp_path / "m.gguf", vocab, "llama", pre="made-up-pre")
    with pytest.raises(UserError, match="unsupported pre-tokenizer 'made-up-pre'.*qwen2"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert_no_leftovers(tmp_path, "out")


# --------------------------------------------------------------------------- bad input


def test_unsupported_architecture_names_the_supported_ones(tmp_path, vocab):
    write_gguf(tmp_path / "m.gguf", vocab, "gpt2")
    with pytest.raises(
        UserError,
        match=r"unsupported architecture 'gpt2'.*supported: gemma2, gemma3, llama, phi3, qwen2, qwen3, qwen3moe$",
    ) as err:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert_no_leftovers(tmp_path, "out")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_text("this is not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert_no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("keep", [0.3, 0.999])
def test_truncated_file(tmp_path, vocab, keep):
    write_gguf(tmp_path / "m.gguf", vocab, "llama")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError, match="truncated") as err:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert_no_leftovers(tmp_path, "out")


def test_tensor_type_the_gguf_package_cannot_decode(tmp_path, vocab):
    path = tmp_path / "m.gguf"
    write_gguf(path, vocab, "llama")
    # Rewrite one tensor's type id in the header to Q8_K (valid enum, no dequantizer)...
    header = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = header.index(name) + len(name) + 4 + 8  # skip n_dims (u32) and one dim (u64)
    header[at : at + 4] = int(Q.Q8_K).to_bytes(4, "little")
    (tmp_path / "q8k.gguf").write_bytes(bytes(header))
    with pytest.raises(UserError, match="type Q8_K, which the gguf package cannot dequantize"):
        convert_gguf(tmp_path / "q8k.gguf", tmp_path / "out")
    # ...and to an id no gguf version knows.
    header[at : at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "unknown.gguf").write_bytes(bytes(header))
    with pytest.raises(UserError, match="unknown type"):
        convert_gguf(tmp_path / "unknown.gguf", tmp_path / "out")
    assert_no_leftovers(tmp_path, "out")


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_dir(tmp_path, vocab, monkeypatch):
    from mlx_abliteration.io import gguf_tokenizer

    write_gguf(tmp_path / "m.gguf", vocab, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    patch_everywhere(monkeypatch, gguf_tokenizer, "write_tokenizer_files", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"


# --------------------------------------------------------------------------- layout and caching


def test_large_models_are_written_as_shards_with_an_index(tmp_path, vocab, monkeypatch):
    from mlx_abliteration.io.model_io import load_model

    write_gguf(tmp_path / "m.gguf", vocab, "qwen2", tie=False)
    monkeypatch.setattr(gguf_tensors, "MAX_SHARD_BYTES", 600_000)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = load_safetensors(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    load_model(out)


def test_cached_conversion_is_keyed_by_file_hash(tmp_path, vocab):
    write_gguf(tmp_path / "a.gguf", vocab, "llama")
    first = convert_gguf_cached(tmp_path / "a.gguf", tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes())
    again = convert_gguf_cached(tmp_path / "b.gguf", tmp_path / "cache")
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "cache" / "converted"
    assert convert_gguf_cached(tmp_path / "a.gguf", tmp_path / "cache", dtype="float16") != first


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, vocab):
    from mlx_abliteration.io.model_io import load_model

    def add_rope_freqs(writer):
        freqs = 10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        wavelen = 2 * np.pi / freqs
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        factors = np.where(
            wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, 32.0, 1 / ((1 - smooth) / 32.0 + smooth))
        )
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))

    write_gguf(tmp_path / "m.gguf", vocab, "llama", extra=add_rope_freqs)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in load_safetensors(out)
    load_model(out)


# --------------------------------------------------------------------------- CLI


def test_import_gguf_cli(tmp_path, vocab):
    write_gguf(tmp_path / "m.gguf", vocab, "llama", types={"q_proj": Q.Q8_0})
    cmd = [sys.executable, "-m", "mlx_abliteration", "import-gguf"]
    ok = subprocess.run(
        [*cmd, str(tmp_path / "m.gguf"), "-o", str(tmp_path / "out"), "--dtype", "float16"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    bad = subprocess.run(
        [*cmd, str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "bad_out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: cannot read GGUF file") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "bad_out").exists()
