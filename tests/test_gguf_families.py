"""GGUF export and import of every supported family, round-tripped on tiny random mlx-lm models.

For each family: a bfloat16 model exported as bf16 and imported again is the same model bit for
bit (weights and logits), and exporting that import gives the same GGUF tensors again; a float32
model exported as Q8_0 and imported as float16 stays within the formats' element bounds and its
logits within the first-order bound of those (``test_gguf_export`` derives both). Every tensor
name is one llama.cpp knows for the family (the ``gguf`` package's ``MODEL_TENSORS``), and the
family's hyperparameters come back in config.json.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.export.gguf_export import export_gguf
from mlx_abliteration.io.gguf import convert_gguf
from mlx_abliteration.io.gguf_families import ARCHITECTURES, is_norm
from tests.support.tiny_models import build_tiny_model
from tests.test_gguf_export import (
    _rounding,
    element_bounds,
    first_order_logit_bound,
    float32_model,
    last_logits,
    load,
    logits_with,
)

# Tiny models of each family: hidden 64, 4 layers (gemma3: 6, so that one layer is global), random norms
# where the family stores them shifted.
FAMILIES: dict[str, dict] = {
    "llama": {"arch": "llama"},
    "mistral": {"arch": "mistral", "tie": False},
    "mixtral": {"arch": "mixtral", "tie": False},
    "qwen2": {"arch": "qwen2", "tie": False},
    "qwen3": {"arch": "qwen3"},
    "qwen3_moe": {"arch": "qwen3_moe", "tie": False},
    "phi3": {"arch": "phi3", "tie": False},
    "gemma2": {"arch": "gemma2", "vector_std": 0.1},
    "gemma3_text": {"arch": "gemma3_text", "num_layers": 6, "vector_std": 0.1},
}
# Hyperparameters that must come back from the GGUF (beyond the shapes every family has).
FAMILY_KEYS = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"),
    "gemma3_text": ("query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "rope_local_base_freq"),
    "phi3": ("original_max_position_embeddings", "partial_rotary_factor"),
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built: dict[tuple, Path] = {}

    def make(family: str, **kwargs) -> Path:
        options = {**FAMILIES[family], **kwargs}
        key = (family, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}"), **options)
        return built[key]

    return make


def dense_params(model) -> dict[str, np.ndarray]:
    """Every parameter as float32; quantized layers (linear, embedding, stacked experts) dequantized exactly."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = {}
    for path, module in model.named_modules():
        if "scales" in module and "weight" in module:
            scales, biases = module["scales"].astype(mx.float32), module["biases"].astype(mx.float32)
            w = mx.dequantize(module["weight"], scales, biases, module.group_size, module.bits)
            out[f"{path}.weight"] = np.array(w)
    for name, value in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") or (leaf == "weight" and name in out):
            continue
        out[name] = np.array(value.astype(mx.float32))
    return out


def setting(model, model_dir: Path, key: str):
    """A hyperparameter as mlx-lm runs it (its ModelArgs), or as config.json has it where mlx-lm has no field."""
    import json

    if hasattr(model.args, key):
        return getattr(model.args, key)
    return json.loads((model_dir / "config.json").read_text())[key]


def tensors_of(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def known_tensor_names(gguf_arch: str, layers: int) -> set[str]:
    """Every tensor name llama.cpp's ``gguf`` package lists for the architecture, blocks expanded."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    names = set()
    for tensor in gguf.MODEL_TENSORS[arch]:
        template = gguf.TENSOR_NAMES[tensor]
        blocks = range(layers) if "{bid}" in template else [None]
        for bid in blocks:
            base = template.format(bid=bid) if bid is not None else template
            names.update({f"{base}.weight", f"{base}.bias"})
    return names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_export_import_is_the_same_model_and_the_same_file_again(tmp_path, family_model, family):
    import mlx.core as mx

    src = family_model(family, dtype="bfloat16")
    first = export_gguf(src, tmp_path / "a.gguf", "bf16")
    reader = gguf.GGUFReader(first)
    arch = reader.fields["general.architecture"].contents()
    assert arch == GGUF_ARCH.get(family, family)
    layers = reader.fields[f"{arch}.block_count"].contents()
    assert {t.name for t in reader.tensors} <= known_tensor_names(arch, layers)

    back = convert_gguf(first, tmp_path / "back", dtype="bfloat16")
    source_model, round_trip = load(src), load(back)  # mlx_lm.load opens the imported folder
    expected, got = dense_params(source_model), dense_params(round_trip)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    for model in (source_model, round_trip):  # the CPU's gather_mm (experts) computes in float32 only
        model.set_dtype(mx.float32)
    assert np.array_equal(last_logits(source_model), last_logits(round_trip))

    for key in FAMILY_KEYS.get(family, ()):
        assert setting(round_trip, back, key) == setting(source_model, src, key), key

    again = export_gguf(back, tmp_path / "b.gguf", "bf16")
    assert tensors_of(again) == tensors_of(first)


def _shifted_norm_bounds(weights: dict[str, np.ndarray], bounds: dict[str, np.ndarray], shift: float) -> None:
    """Gemma's norms are written as float32 1 + w: one more float32 rounding of 1 + w."""
    for name, w in weights.items():
        if shift and is_norm(name):
            bounds[name] = bounds[name] + 2.0**-24 * (shift + np.abs(w)) * (1 + 2.0**-10)


# MoE routing picks experts by rank: with every expert used the mixture is continuous in the weights,
# so the first-order bound holds (with top-k of more experts a rounding may switch an expert).
Q8_OVERRIDES = {"mixtral": {"num_experts_per_tok": 2}, "qwen3_moe": {"num_experts_per_tok": 4}}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "qwen2", "qwen3")])
def test_q8_0_round_trip_stays_within_the_formats_bounds(tmp_path, family_model, family):
    src = family_model(family, overrides=Q8_OVERRIDES.get(family))
    export_gguf(src, tmp_path / "m.gguf", "q8_0")
    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "Q8_0" in types
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="float16")
    imported = load(back)
    quantized = {path for path, module in imported.named_modules() if "scales" in module}
    assert "model.layers.0.self_attn.o_proj" in quantized or "model.layers.0.self_attn.qkv_proj" in quantized
    if ARCHITECTURES[_model_type(family)].experts:  # Q8_0 experts stay 8-bit (MLX's QuantizedSwitchLinear)
        assert any(path.endswith("switch_mlp.down_proj") for path in quantized)
    expected, got = dense_params(load(src)), dense_params(imported)
    assert expected.keys() == got.keys()
    bounds = element_bounds(expected, "q8_0", "float16")
    for name, w in expected.items():
        if ".gate.weight" in name:  # the MoE router: float32 in the file, float16 after import
            bounds[name] = _rounding(w, "float16")
    _shifted_norm_bounds(expected, bounds, ARCHITECTURES[_model_type(family)].norm_shift)
    for name in expected:
        assert np.all(np.abs(got[name] - expected[name]) <= bounds[name]), name
    model = float32_model(src)
    diff = np.abs(logits_with(model, got) - logits_with(model, expected))
    logit_bound = first_order_logit_bound(model, expected, bounds)
    print(
        f"{family} q8_0: max logit diff {diff.max():.3g}, largest share of the bound {(diff / logit_bound).max():.3g}"
    )
    assert np.all(diff <= logit_bound), float((diff / logit_bound).max())
    assert diff.max() > 0


def _model_type(family: str) -> str:
    return "llama" if family == "mistral" else family


@pytest.mark.parametrize(
    "family,overrides,text",
    [
        ("gemma3_text", {"sliding_window_pattern": 4}, "sliding_window_pattern 4"),
        ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "dense layers"),
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob false"),
    ],
)
def test_what_llama_cpp_would_run_differently_is_refused(tmp_path, family_model, family, overrides, text):
    src = family_model(family, overrides=overrides, num_layers=2)
    with pytest.raises(UserError, match=text) as err:
        export_gguf(src, tmp_path / "m.gguf")
    assert "\n" not in str(err.value) and "llama.cpp" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_4bit_experts_are_dequantized_and_written(tmp_path, family_model, family):
    """A 4-bit MLX MoE (QuantizedSwitchLinear experts) exported as bf16: every weight within bf16 rounding."""
    src = family_model(family, bits=4)
    export_gguf(src, tmp_path / "m.gguf", "bf16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "BF16" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="bfloat16")
    expected, got = dense_params(load(src)), dense_params(load(back))
    assert expected.keys() == got.keys()
    bounds = element_bounds(expected, "bf16", "bfloat16")
    for name in expected:
        assert np.all(np.abs(got[name] - expected[name]) <= bounds[name]), name
