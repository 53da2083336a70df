"""export-gguf: tiny models round-trip through the CLI, import-gguf and mlx_lm.load; real files match llama.cpp's.

Tolerances come from the formats, not from measurements:
- bf16 -> bf16 copies bits, so the round-tripped model computes exactly the same logits.
- f16 / bf16 rounding of a float32 weight w is off by at most u*|w| (round to nearest; u = 2^-11 for
  f16, 2^-8 for bf16), plus half the smallest subnormal below the normal range.
- Q8_0 stores a block of 32 as d*q with d = f16(amax/127), q = round(x*127/amax), |q| <= 127: each
  element is off by at most d/2 (rounding q) + 127*|d - amax/127| <= (1/2 + 127*2^-11) * amax/127.
- Logits: the change of logit k is, to first order, sum_i dz_k/dw_i * dw_i, so it is at most
  sum_i |dz_k/dw_i| * B_i for the element bounds B above (the worst case, every error aligned;
  the second-order rest is O(u^2) of it and the realized errors are nowhere near aligned).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.export.gguf_export import export_gguf
from mlx_abliteration.io.gguf import convert_gguf
from tests import test_gguf
from tests.cli_helpers import run_cli
from tests.test_gguf import write_gguf

vocab = test_gguf.vocab  # the fixture: tokens, merges and types of the tiny tokenizer
F16_U, BF16_U = 2.0**-11, 2.0**-8
Q8_0_REL = (0.5 + 127 * 2.0**-11) / 127  # of the block's largest magnitude
PROMPT = [5, 17, 42, 99, 200, 7, 3]


def export(src: Path, out: Path, outtype: str = "bf16", *extra: str):
    result = run_cli("export-gguf", str(src), "-o", str(out), "--outtype", outtype, *extra)
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stderr and out.is_file()
    return result


def load(path: Path):
    from mlx_lm import load as mlx_load

    model, _ = mlx_load(str(path))
    return model


def dense_params(model) -> dict[str, np.ndarray]:
    """Every weight matrix and vector as float32; quantized layers dequantized exactly (float32 scales)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            scales, biases = module.scales.astype(mx.float32), module.biases.astype(mx.float32)
            w = mx.dequantize(module.weight, scales, biases, module.group_size, module.bits)
            out[f"{path}.weight"] = np.array(w)
    for name, value in tree_flatten(model.parameters()):
        module = name.rpartition(".")[0]
        if not name.endswith((".scales", ".biases")) and f"{module}.weight" not in out or name.endswith(".bias"):
            out[name] = np.array(value.astype(mx.float32))
    return out


def float32_model(source_dir: Path):
    """The source as a dense float32 model: the one place both weight sets are computed."""
    import mlx.core as mx

    from mlx_abliteration.io.model_io import load_model

    return load_model(source_dir, compute_dtype=mx.float32, dequantize=True)[0]


def logits_with(model, weights: dict[str, np.ndarray]) -> np.ndarray:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    return np.array(model(mx.array([PROMPT]))[0, -1].astype(mx.float32))


def last_logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([PROMPT]))[0, -1].astype(mx.float32))


def _rounding(w: np.ndarray, dtype: str) -> np.ndarray:
    u, tiny = (F16_U, 2.0**-25) if dtype in ("f16", "float16") else (BF16_U, 2.0**-134)
    return u * np.abs(w) + tiny


def element_bounds(weights: dict[str, np.ndarray], outtype: str, import_dtype: str) -> dict[str, np.ndarray]:
    """Largest error each element may get from export as ``outtype`` and import as ``import_dtype``.

    Matrices: the outtype's rounding (the import keeps f16, bf16 and Q8_0 values exactly in the
    dtype chosen for it). Vectors: written as float32, rounded by the import to its dtype.
    """
    bounds = {}
    for name, w in weights.items():
        if w.ndim == 1:
            bounds[name] = _rounding(w, import_dtype)
        elif outtype == "q8_0":
            amax = np.abs(w.reshape(w.shape[0], -1, 32)).max(axis=-1, keepdims=True)
            bounds[name] = np.broadcast_to(amax * Q8_0_REL, (*amax.shape[:2], 32)).reshape(w.shape)
        else:
            bounds[name] = _rounding(w, outtype)
    return bounds


def first_order_logit_bound(model, weights: dict[str, np.ndarray], bounds: dict[str, np.ndarray]) -> np.ndarray:
    """sum_i |dz_k/dw_i| * B_i for every logit k at the prompt's last position, at ``weights``."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    tokens = mx.array([PROMPT])
    grad = nn.value_and_grad(model, lambda k: model(tokens)[0, -1, k])
    result = []
    for k in range(model.args.vocab_size):
        _, grads = grad(k)
        total = sum(float(mx.sum(mx.abs(g) * mx.array(bounds[n]))) for n, g in tree_flatten(grads) if n in bounds)
        result.append(total)
    return np.array(result)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False), ("qwen3", False), ("qwen3", True)])
def test_bf16_source_round_trips_bit_for_bit(tmp_path, tiny_model, arch, tie):
    src = tiny_model(arch=arch, tie=tie, dtype="bfloat16")
    export(src, tmp_path / "m.gguf", "bf16")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (not tie)
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="bfloat16")
    source_model, round_trip = load(src), load(back)
    expected, got = dense_params(source_model), dense_params(round_trip)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert np.array_equal(last_logits(source_model), last_logits(round_trip))


def check_rounded_round_trip(src: Path, tmp_path: Path, outtype: str, expect_change: bool = True) -> None:
    """Export, import, load: weights within the element bounds, logits within the first-order bound."""
    export(src, tmp_path / "m.gguf", outtype)
    import_dtype = "bfloat16" if outtype == "bf16" else "float16"  # float16 keeps Q8_0's f16 scales exact
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype=import_dtype)
    expected, got = dense_params(load(src)), dense_params(load(back))
    assert expected.keys() == got.keys()
    bounds = element_bounds(expected, outtype, import_dtype)
    for name in expected:
        assert np.all(np.abs(got[name] - expected[name]) <= bounds[name]), name
    model = float32_model(src)
    diff = np.abs(logits_with(model, got) - logits_with(model, expected))
    logit_bound = first_order_logit_bound(model, expected, bounds)
    assert np.all(diff <= logit_bound), float((diff / logit_bound).max())
    assert diff.max() > 0 or not expect_change  # rounding happened: two different models were compared


@pytest.mark.parametrize(
    "arch,outtype,bits",
    [
        ("llama", "f16", None),
        ("qwen2", "q8_0", None),
        ("llama", "q8_0", None),
        ("llama", "bf16", 4),
        ("qwen3", "q8_0", None),
    ],
)
def test_rounded_round_trip_stays_within_the_formats_bounds(tmp_path, tiny_model, arch, outtype, bits):
    src = tiny_model(arch=arch, bits=bits) if bits else tiny_model(arch=arch)
    check_rounded_round_trip(src, tmp_path, outtype)


def test_rope_traditional_source_is_written_unpermuted(tmp_path, tiny_model):
    """Weights that MLX runs with traditional (interleaved) RoPE are already in llama.cpp's layout: written
    as they are; the import un-permutes them and sets rope_traditional false, which is the same model."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model(arch="llama"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_traditional": True}))
    export(src, tmp_path / "m.gguf", "f16")
    expected = dense_params(load(src))
    q = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.attn_q.weight")
    source_q = expected["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(np.asarray(q.data).reshape(source_q.shape), source_q.astype(np.float16))
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="float16")
    assert json.loads((back / "config.json").read_text())["rope_traditional"] is False
    model = float32_model(src)
    bound = first_order_logit_bound(model, expected, element_bounds(expected, "f16", "float16"))
    diff = np.abs(last_logits(float32_model(back)) - logits_with(model, expected))
    assert np.all(diff <= bound), float((diff / bound).max())


def _llama3_rope_freqs(writer) -> None:
    """Llama 3.x scaling as llama.cpp's converter stores it (a test_gguf model has head_dim 64)."""
    freqs = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))


def _linear_rope(writer) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)


@pytest.mark.parametrize(
    "arch,tie,qtype,outtype,pre,extra",
    [
        ("llama", True, "F16", "f16", "smollm", None),
        ("qwen2", False, "F16", "f16", "qwen2", None),
        ("llama", False, "Q8_0", "q8_0", "llama-bpe", _llama3_rope_freqs),
        ("llama", True, "F16", "f16", "gpt-2", _linear_rope),
    ],
)
def test_gguf_import_then_export_gives_the_same_file(tmp_path, vocab, arch, tie, qtype, outtype, pre, extra):
    """A GGUF written the way llama.cpp's converter writes it (test_gguf's writer, with its own Q/K
    permutation), imported and exported again: every matrix's bytes (norms and biases: as the import's
    float16 kept them) and every key's value come back. Q8_0 too: a dequantized Q8_0 block re-quantizes
    to the same scale (its largest |q| is 127) and the same q."""
    original = tmp_path / "a.gguf"
    write_gguf(original, vocab, arch, tie=tie, default_type=gguf.GGMLQuantizationType[qtype], pre=pre, extra=extra)
    convert_gguf(original, tmp_path / "mlx", dtype="float16")
    export(tmp_path / "mlx", tmp_path / "b.gguf", outtype)
    before, after = gguf.GGUFReader(original), gguf.GGUFReader(tmp_path / "b.gguf")
    for key, field in before.fields.items():
        if not key.startswith("GGUF."):
            assert after.fields[key].types == field.types and after.fields[key].contents() == field.contents(), key
    written = {t.name: t for t in after.tensors}
    assert written.keys() == {t.name for t in before.tensors}
    for tensor in before.tensors:
        assert written[tensor.name].tensor_type == tensor.tensor_type, tensor.name
        expected = np.asarray(tensor.data)
        if tensor.name.endswith(("_norm.weight", ".bias")):  # float32 vectors: the import stored them as float16
            expected = expected.astype(np.float16).astype(np.float32)
        assert np.array_equal(np.asarray(written[tensor.name].data), expected), tensor.name


def test_metadata_names_what_llama_cpp_reads(tmp_path, tiny_model):
    src = tiny_model(arch="qwen2", tie=False)
    export(src, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "qwen2"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["qwen2.block_count"] == 4 and meta["qwen2.embedding_length"] == 64
    assert meta["qwen2.attention.head_count"] == 4 and meta["qwen2.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.padding_token_id"] == 0
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.bias"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"


# --------------------------------------------------------------------------- errors


def assert_user_error(result, text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert text in result.stderr


def test_existing_output_needs_overwrite(tmp_path, tiny_model):
    src, out = tiny_model(arch="llama"), tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    result = run_cli("export-gguf", str(src), "-o", str(out))
    assert_user_error(result, "--overwrite")
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    export(src, out, "bf16", "--overwrite")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize(
    "case,text",
    [
        ("gpt2", "does not support model_type 'gpt2'; supported: llama, mixtral, qwen2"),
        ("not_a_model", "has no config.json"),
        ("output_is_dir", "is a folder"),
    ],
)
def test_user_errors_leave_nothing(tmp_path, tiny_model, case, text):
    src = tiny_model(arch="gpt2") if case == "gpt2" else tiny_model(arch="llama")
    out = tmp_path / "out" / "m.gguf"
    if case == "not_a_model":
        src = tmp_path / "empty"
        src.mkdir()
    if case == "output_is_dir":
        out.mkdir(parents=True)
    assert_user_error(run_cli("export-gguf", str(src), "-o", str(out)), text)
    leftovers = list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == ([out] if case == "output_is_dir" else [])


def test_bad_outtype(tmp_path, tiny_model):
    result = run_cli("export-gguf", str(tiny_model()), "-o", str(tmp_path / "m.gguf"), "--outtype", "q4_k")
    assert result.returncode == 2 and "invalid choice: 'q4_k'" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match="unsupported --outtype 'q4_k'"):
        export_gguf(tiny_model(), tmp_path / "m.gguf", outtype="q4_k")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, tiny_model, monkeypatch):
    import errno

    from mlx_abliteration.export import gguf_export

    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    calls = {"n": 0}
    real = gguf_export.tensor_bytes

    def disk_full(tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(gguf_export, "tensor_bytes", disk_full)
    with pytest.raises(UserError, match="No space left"):
        export_gguf(tiny_model(), out, overwrite=True)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# --------------------------------------------------------------------------- real models (slow)

# Provenance text llama.cpp's converter copies from the model card; llama.cpp does not read it to run the model.
DESCRIPTIVE = {
    "general.name",
    "general.organization",
    "general.finetune",
    "general.basename",
    "general.size_label",
    "general.license",
    "general.languages",
}
# Keys the real files lack that we write: tokenizer_config.json's add_eos_token (false: llama.cpp's default).
EXTRA = {"tokenizer.ggml.add_eos_token"}
# Keys the real files have that we leave out, with the value llama.cpp assumes without them for a gpt2 vocab.
DEFAULTED = {"tokenizer.ggml.add_space_prefix": False}


def assert_metadata_matches(reference: gguf.GGUFReader, ours: gguf.GGUFReader, outtype: str) -> None:
    """Every key of the llama.cpp-converted file with the same GGUF type and value, key by key."""
    file_type = {"bf16": 32, "f16": 1, "q8_0": 7}[outtype]
    for key, field in reference.fields.items():
        if key.startswith("GGUF.") or key in DESCRIPTIVE:
            continue
        if key in DEFAULTED and key not in ours.fields:
            assert field.contents() == DEFAULTED[key], key
            continue
        assert key in ours.fields, key
        assert ours.fields[key].types == field.types, key
        expected = file_type if key == "general.file_type" else field.contents()
        assert ours.fields[key].contents() == expected, key
    extra = {k for k in ours.fields if not k.startswith("GGUF.") and k not in DESCRIPTIVE} - set(reference.fields)
    assert extra <= EXTRA, extra
    assert ours.fields["tokenizer.ggml.add_eos_token"].contents() is False


def assert_same_tensor_list(reference: gguf.GGUFReader, ours: gguf.GGUFReader, outtype: str) -> None:
    shapes = {t.name: t.shape.tolist() for t in reference.tensors}
    assert {t.name: t.shape.tolist() for t in ours.tensors} == shapes
    matrix_type = {"bf16": "BF16", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    assert {t.name: t.tensor_type.name for t in ours.tensors} == {
        name: "F32" if len(shape) == 1 else matrix_type for name, shape in shapes.items()
    }


@pytest.mark.slow
def test_smollm2_export_matches_the_llama_cpp_file_and_round_trips(smollm2_dir, tmp_path):
    """The imported SmolLM2 (Q4_1, lossless in MLX) exported as f16 is the original file's tensors rounded
    to f16 (incl. llama.cpp's Q/K row order), with its metadata; imported again it computes the same logits
    within the first-order bound of that rounding."""
    import mlx.core as mx
    import mlx.nn as nn

    from tests.support.real_models import ensure_gguf

    export(smollm2_dir, tmp_path / "m.gguf", "f16")
    reference, ours = gguf.GGUFReader(ensure_gguf("smollm2")), gguf.GGUFReader(tmp_path / "m.gguf")
    assert_metadata_matches(reference, ours, "f16")
    assert_same_tensor_list(reference, ours, "f16")
    written = {t.name: t for t in ours.tensors}
    for tensor in reference.tensors:
        exact = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        got = np.asarray(written[tensor.name].data).astype(np.float32).reshape(exact.shape)
        bound = np.zeros_like(exact) if exact.ndim == 1 else _rounding(exact, "f16")
        assert np.all(np.abs(got - exact) <= bound), tensor.name

    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="float16")
    expected, got_params = dense_params(load(smollm2_dir)), dense_params(load(back))
    bounds = element_bounds(expected, "f16", "float16")
    for name in expected:
        assert np.all(np.abs(got_params[name] - expected[name]) <= bounds[name]), name
    model = float32_model(smollm2_dir)
    diff = np.abs(logits_with(model, got_params) - logits_with(model, expected))
    # the first-order bound for the five largest logits (one gradient each over 135M weights)
    top = np.argsort(logits_with(model, expected))[-5:]
    tokens = mx.array([PROMPT])
    grad = nn.value_and_grad(model, lambda k: model(tokens)[0, -1, k])
    from mlx.utils import tree_flatten

    for k in top:
        _, grads = grad(int(k))
        bound = sum(float(mx.sum(mx.abs(g) * mx.array(bounds[n]))) for n, g in tree_flatten(grads) if n in bounds)
        assert diff[k] <= bound, (int(k), float(diff[k]), bound)
    assert int(np.argmax(logits_with(model, got_params))) == int(top[-1])


@pytest.mark.slow
def test_qwen_export_matches_the_llama_cpp_file_bit_for_bit(qwen_dir, tmp_path):
    """Qwen2.5 (bf16 in MLX) exported as bf16: the real file's metadata and tensor list, and every tensor the
    source's bits. With identical hyperparameters and weights the model is the same; that import-gguf
    then computes the source's logits is the tiny qwen2 round trip above (a 3.5 GB re-import would not
    fit the slow group's budget)."""
    from mlx_abliteration.io.gguf_families import mlx_tensor_name
    from tests.support.real_models import ensure_gguf

    export(qwen_dir, tmp_path / "m.gguf", "bf16")
    reference, ours = gguf.GGUFReader(ensure_gguf("qwen")), gguf.GGUFReader(tmp_path / "m.gguf")
    assert_metadata_matches(reference, ours, "bf16")
    assert_same_tensor_list(reference, ours, "bf16")
    source: dict[str, np.ndarray] = {}
    for path in sorted(qwen_dir.glob("model*.safetensors")):
        source.update(bf16_bits(path))
    for tensor in ours.tensors:
        original = source[mlx_tensor_name(tensor.name)]
        if tensor.tensor_type.name == "BF16":
            stored = np.asarray(tensor.data).view(np.uint16)  # the reader gives bf16 as raw bytes
            assert np.array_equal(stored.reshape(original.shape), original), tensor.name
        else:  # float32 vectors: bf16 widened exactly
            widened = (original.astype(np.uint32) << 16).view(np.float32)
            assert np.array_equal(np.asarray(tensor.data), widened), tensor.name


def bf16_bits(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's bf16 tensors as memory-mapped uint16 bit patterns (numpy has no bfloat16)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["dtype"] == "BF16", name
            start, stop = info["data_offsets"]
            out[name] = np.memmap(path, np.uint16, "r", 8 + size + start, tuple(info["shape"]))
            assert out[name].nbytes == stop - start
    return out


@pytest.mark.parametrize(
    "change,text",
    [
        (lambda t: {**t, "normalizer": {"type": "Lowercase"}}, "matches none that llama.cpp knows"),
        (lambda t: {**t, "model": {**t["model"], "type": "Unigram"}}, "neither a byte-level BPE nor a SentencePiece"),
        (lambda t: {**t, "added_tokens": [*t["added_tokens"], {"id": 999, "content": "x", "special": True}]}, "999"),
        (None, "has no tokenizer.json"),
    ],
)
def test_tokenizers_gguf_cannot_describe_are_user_errors(tmp_path, tiny_model, change, text):
    src = tmp_path / "src"
    shutil.copytree(tiny_model(arch="llama"), src)
    if change is None:
        (src / "tokenizer.json").unlink()
    else:
        (src / "tokenizer.json").write_text(json.dumps(change(json.loads((src / "tokenizer.json").read_text()))))
    out = tmp_path / "out" / "m.gguf"
    assert_user_error(run_cli("export-gguf", str(src), "-o", str(out)), text)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path, tiny_model):
    """As llama.cpp's converter does: Q8_0 blocks need rows of whole blocks of 32."""
    src = tiny_model(arch="llama", hidden_size=48)
    export(src, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="float16")
    expected, got = dense_params(load(src)), dense_params(load(back))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.all(np.abs(got[q] - expected[q]) <= _rounding(expected[q], "f16"))
