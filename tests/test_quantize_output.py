"""--quantize {4,8,mxfp4}: the abliterated model written quantized like mlx_lm.convert -q, through the CLI."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from .cli_helpers import run_cli

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(16)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(16)]
TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 11]])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.txt").write_text("\n".join(HARMLESS))
    return d / "harmful.txt", d / "harmless.txt"


def _run(model, out, datasets, *extra):
    result = run_cli(
        "run",
        "-m",
        str(model),
        "-o",
        str(out),
        "--harmful-dataset",
        str(datasets[0]),
        "--harmless-dataset",
        str(datasets[1]),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--no-eval",
        "--use-layer",
        "2",
        "--quiet",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return out


def _logits(path):
    model, _ = mlx_lm.load(str(path))
    return model(TOKENS).astype(mx.float32)


def _rel_error(a, b):
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


@pytest.mark.parametrize("quantize,bits,group", [("8", 8, 64), ("4", 4, 32), ("mxfp4", 4, 32)])
def test_quantized_output_loads_and_matches_dense(tiny_model, tmp_path, datasets, quantize, bits, group):
    model = tiny_model(num_shards=2)
    dense = _run(model, tmp_path / "dense", datasets)
    extra = ["--q-group-size", str(group)] if quantize == "4" else []
    out = _run(model, tmp_path / "q", datasets, "--quantize", quantize, *extra)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group
    assert config["quantization"]["mode"] == ("mxfp4" if quantize == "mxfp4" else "affine")
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log["quantized_output"]["bits"] == bits and log["parameters"]["quantize"] == quantize
    assert set(log["weights"]["output_sha256"]) == {p.name for p in out.glob("model*.safetensors")}
    assert log["edits"]["modules"] > 0
    # mlx_lm.load builds the quantized layers and the logits follow the dense abliterated model's
    loaded, _ = mlx_lm.load(str(out))
    assert isinstance(loaded.model.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    # the logits follow the dense abliterated model's as closely as mlx_lm.convert -q of the original
    # follows the original (a random tiny model amplifies quantization error, so that is the yardstick)
    from mlx_lm.convert import convert

    mode = "mxfp4" if quantize == "mxfp4" else "affine"
    convert(str(model), str(tmp_path / "orig-q"), quantize=True, q_bits=bits, q_group_size=group, q_mode=mode)
    err = _rel_error(_logits(out), _logits(dense))
    baseline = _rel_error(_logits(tmp_path / "orig-q"), _logits(model))
    assert err < 1.5 * baseline, (err, baseline)
    # smaller on disk than the float32 dense output
    size = lambda p: sum(f.stat().st_size for f in p.glob("model*.safetensors"))  # noqa: E731
    assert size(out) < size(dense) / 3


def test_same_weights_as_mlx_lm_convert_of_the_dense_output(tiny_model, tmp_path, datasets):
    from mlx_lm.convert import convert

    model = tiny_model(num_shards=2)
    dense = _run(model, tmp_path / "dense", datasets)
    out = _run(model, tmp_path / "q", datasets, "--quantize", "4")
    convert(str(dense), str(tmp_path / "converted"), quantize=True, q_bits=4, q_group_size=64)
    ours = mx.load(str(out / "model.safetensors"))
    theirs = mx.load(str(tmp_path / "converted" / "model.safetensors"))
    assert set(ours) == set(theirs) and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    converted = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization"] == converted["quantization"]


def test_quantized_source_is_requantized_from_full_precision(tiny_model, tmp_path, datasets):
    model = tiny_model(bits=4, group_size=32)
    out = _run(model, tmp_path / "q8", datasets, "--quantize", "8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log["quantized_output"]["from_quantized_source"] is True
    # Edited in full precision, then 8-bit: every matrix is the float32 edit up to 8-bit rounding
    # (affine, groups of 64: at most range/510 per element; measured 0.7-0.9 % relative here), far
    # from what requantizing the 4-bit edit would give. Compared as weights, not logits: on CUDA
    # MLX's quantized matmul gave this tiny model's 8-bit logits 1.0 off while its weights were right.
    dense = _run(model, tmp_path / "bf16", datasets, "--edited-precision", "float32")
    quantized, full = _dense_weights(out), _dense_weights(dense)
    assert quantized.keys() == full.keys()
    for name, weight in full.items():
        assert _rel_error(quantized[name], weight) < 0.02, name


def _dense_weights(path):
    """Every matrix of a saved model as float32 (quantized ones dequantized with their own settings)."""
    model, _ = mlx_lm.load(str(path))
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "scales"):
            weights[name] = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits, mode=module.mode
            )
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            weights[name] = module.weight.astype(mx.float32)
    return weights


def test_bad_quantize_settings_fail_before_work(tiny_model, tmp_path, datasets):
    model = tiny_model()
    bad = run_cli("run", "-m", str(model), "-o", str(tmp_path / "o"), "--quantize", "mxfp4", "--q-group-size", "64")
    assert bad.returncode == 2 and "mxfp4 uses groups of 32" in bad.stderr
    assert not (tmp_path / "o").exists()
    bad = run_cli("run", "-m", str(model), "-o", str(tmp_path / "o"), "--q-group-size", "64")
    assert bad.returncode == 2 and "--q-group-size needs --quantize" in bad.stderr
