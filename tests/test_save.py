"""Streaming save: real safetensors files, loaded back with mlx_lm.load."""

import json
import os

import mlx.core as mx
import mlx_lm
import pytest

from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.errors import UserError
from mlx_abliteration.export import save as export_save
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.io.model_io import read_config
from mlx_abliteration.runtime.utils import sha256_file


def _unit(h):
    r = mx.random.normal((h,), key=mx.random.key(3))
    return r / mx.linalg.norm(r)


def _plan(path, strength=1.0, **kwargs):
    config = read_config(path)
    return uniform_plan(_unit(config["hidden_size"]), config["num_hidden_layers"], strength, **kwargs)


def _tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.startswith("model") and f.endswith(".safetensors"):
            out.update({k: (f, v) for k, v in mx.load(str(directory / f)).items()})
    return out


def _generate(path):
    model, tok = mlx_lm.load(str(path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    return mlx_lm.generate(model, tok, prompt=prompt, max_tokens=4)


def test_strength_zero_edits_nothing_and_saves_nothing(tiny_model, tmp_path):
    # A model with no edits is not an abliterated model: never "saved".
    src = tiny_model(num_shards=3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="edits no module"):
        save_ablated_model(src, out, _plan(src, 0.0))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_shards=3),
        dict(num_shards=3, bits=4),
        dict(dtype="bfloat16", num_shards=2),
        dict(arch="qwen2", tie=False),
        dict(dtype="float16", bits=4, embedding_bits=8),
    ],
)
def test_sharded_save_keeps_layout_and_loads(tiny_model, tmp_path, kwargs):
    src = tiny_model(**kwargs)
    before = {p: sha256_file(src / p) for p in os.listdir(src)}
    out = tmp_path / "out"
    summary = save_ablated_model(
        src,
        out,
        _plan(src),
        record={"note": "test"},
        directions=({"refusal_direction": mx.ones(4)}, {"format": "mlx"}),
        model_card="# card",
    )
    assert {p: sha256_file(src / p) for p in os.listdir(src)} == before  # source untouched
    src_tensors, out_tensors = _tensors(src), _tensors(out)
    assert src_tensors.keys() == out_tensors.keys()
    for name, (shard, value) in src_tensors.items():
        assert out_tensors[name][0] == shard  # same shard names
        assert out_tensors[name][1].dtype == value.dtype  # dtype kept (bf16 stays bf16)
        assert out_tensors[name][1].shape == value.shape
    if kwargs.get("num_shards", 1) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in out_tensors.values())
        assert index["weight_map"] == {k: s for k, (s, _) in out_tensors.items()}
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert (out / "README.md").read_text() == "# card"
    log = json.loads((out / "abliteration_log.json").read_text())
    assert log["weights"]["output_sha256"] == {k: sha256_file(out / k) for k in log["weights"]["output_sha256"]}
    assert "refusal_direction" in mx.load(str(out / "refusal_direction.safetensors"))
    assert summary["reports"]
    assert isinstance(_generate(out), str)


def test_metadata_preserved(tiny_model, tmp_path):
    src = tiny_model()
    out = tmp_path / "out"
    save_ablated_model(src, out, _plan(src))
    _, meta = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx"}


def test_higher_precision_edited_matrices_load_dense(tiny_model, tmp_path):
    src = tiny_model(bits=4, embedding_bits=8)
    out = tmp_path / "out"
    summary = save_ablated_model(src, out, _plan(src), edited_precision="bfloat16")
    config = read_config(out)
    assert config["quantization"]["model.layers.0.self_attn.o_proj"] is False
    assert max(r.residual for r in summary["reports"]) < 1e-2
    tensors = _tensors(out)
    assert "model.layers.0.self_attn.o_proj.scales" not in tensors
    assert tensors["model.layers.0.self_attn.o_proj.weight"][1].dtype == mx.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight"][1].dtype == mx.uint32
    assert isinstance(_generate(out), str)


def test_module_split_across_shards(tiny_model, tmp_path):
    """weight and scales of one quantized module stored in different shards."""
    src = tiny_model(bits=4)
    split = tmp_path / "split"
    split.mkdir()
    tensors = mx.load(str(src / "model.safetensors"))
    moved = "model.layers.0.self_attn.o_proj.scales"
    mx.save_safetensors(
        str(split / "model-00001-of-00002.safetensors"), {k: v for k, v in tensors.items() if k != moved}
    )
    mx.save_safetensors(str(split / "model-00002-of-00002.safetensors"), {moved: tensors[moved]})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors if k != moved} | {
        moved: "model-00002-of-00002.safetensors"
    }
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (split / f).write_bytes((src / f).read_bytes())
    out = tmp_path / "out"
    save_ablated_model(split, out, _plan(split))
    direct = tmp_path / "direct"
    save_ablated_model(src, direct, _plan(src))
    a, b = _tensors(out), _tensors(direct)
    assert a[moved][0] == "model-00002-of-00002.safetensors"
    assert all(mx.array_equal(a[k][1], b[k][1]) for k in b)


def test_refuses_bad_outputs(tiny_model, tmp_path):
    src = tiny_model()
    with pytest.raises(UserError, match="is the source"):
        save_ablated_model(src, src, _plan(src))
    with pytest.raises(UserError, match="inside the source"):
        save_ablated_model(src, src / "sub", _plan(src))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        save_ablated_model(src, busy, _plan(src))
    assert (busy / "keep.txt").read_text() == "x"
    save_ablated_model(src, busy, _plan(src), overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").exists()


def test_failure_mid_save_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    src = tiny_model(num_shards=3)
    calls = {"n": 0}
    real = export_save.write_shard

    def failing(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export_save, "write_shard", failing)
    with pytest.raises(UserError, match="disk space"):
        save_ablated_model(src, tmp_path / "out", _plan(src))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(28, "No space left on device"), "No space left on device.*free some disk space"),
        (OSError(30, "Read-only file system"), "read-only"),
        (RuntimeError("[write] Unable to write 3897696 bytes to file."), "short write.*free some disk space"),
        (RuntimeError("bug"), None),  # not the user's disk: keeps its type and traceback
        (RuntimeError("[metal::malloc] Attempting to allocate 9 bytes which is greater than the maximum"), None),
        (OSError(5, "Input/output error"), None),
    ],
)
def test_save_failures_are_reported_as_what_they_are(tiny_model, tmp_path, monkeypatch, error, expected):
    src = tiny_model(num_shards=2)

    def failing(path, *args, **kwargs):
        raise error

    monkeypatch.setattr(export_save, "write_shard", failing)
    if expected is None:
        with pytest.raises(type(error)) as info:
            save_ablated_model(src, tmp_path / "out", _plan(src))
        assert info.value is error and not isinstance(info.value, UserError)
        assert "disk" not in str(info.value)
    else:
        with pytest.raises(UserError, match=expected) as info:
            save_ablated_model(src, tmp_path / "out", _plan(src))
        assert info.value.__cause__ is error  # --debug shows where it came from
    assert os.listdir(tmp_path) == []  # nothing left either way


def test_mlx_open_failure_names_the_real_cause(tiny_model, tmp_path, monkeypatch):
    src = tiny_model()
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def failing(path, *args, **kwargs):  # MLX's message carries no errno; the cause is found by opening the path
        raise RuntimeError(f"[save_safetensors] Failed to open file {blocker / 'sub' / 'model.safetensors'}")

    monkeypatch.setattr(mx, "save_safetensors", failing)  # MLX writes the direction file
    direction = ({"refusal_direction": mx.ones(4)}, {"format": "mlx"})
    with pytest.raises(UserError, match="Not a directory.*a part of the path is a file"):
        save_ablated_model(src, tmp_path / "out", _plan(src), directions=direction)


def test_copied_shard_reuses_the_source_digest(tiny_model, tmp_path):
    # Editing only layer 0 leaves the later shards byte-copied: their recorded
    # digest is the source's (not re-read) and must still be the file's own.
    src = tiny_model(num_shards=3, num_layers=4)
    out = tmp_path / "out"
    summary = save_ablated_model(src, out, _plan(src, ablate_layers=[0], targets=("mlp.down_proj",)))
    copied = [name for name in summary["output_sha256"] if sha256_file(src / name) == sha256_file(out / name)]
    assert copied, "no shard was left unedited; the test needs one"
    assert summary["output_sha256"] == {name: sha256_file(out / name) for name in summary["output_sha256"]}
    assert all(summary["output_sha256"][name] == summary["source_sha256"][name] for name in copied)
