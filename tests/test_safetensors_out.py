"""The save's own safetensors writer: MLX's file format, bytes and SHA256 as written, real saves read back."""

import errno
import json
import os
import struct
import threading

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open

from mlx_abliteration.edit.orthogonalize import edit_module
from mlx_abliteration.errors import UserError
from mlx_abliteration.export import save as export_save
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.export.source_layout import discover_writers_in_dir
from mlx_abliteration.io import safetensors_out
from mlx_abliteration.io.model_io import quant_params_for, read_config
from mlx_abliteration.io.safetensors_out import array_entry, read_header, source_entry, start_writeback, write_shard
from mlx_abliteration.runtime.utils import sha256_file

from .test_save import _plan


def _arrays():
    key = mx.random.key(7)
    return {
        "bf16": mx.random.normal((5, 7), key=key).astype(mx.bfloat16),
        "f16": mx.random.normal((3,), key=key).astype(mx.float16),
        "f32": mx.random.normal((2, 3, 4), key=key),
        "packed": mx.random.randint(0, 2**31, (4, 8), key=key).astype(mx.uint32),
        "i64": mx.arange(-3, 3, dtype=mx.int64),
        "flag": mx.array([True, False, True]),
        "z": mx.array([1 + 2j, 3 - 4j], dtype=mx.complex64),
        "scalar": mx.array(2.5),
        "empty": mx.zeros((0, 4)),
        "Upper.name": mx.ones((2,), dtype=mx.int8),
        "transposed": mx.arange(12, dtype=mx.float32).reshape(3, 4).T,  # not row-contiguous
        "\u00e9t\u00e9": mx.ones((1,), dtype=mx.uint16),
    }


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def _bytes(a):
    return bytes(memoryview(mx.contiguous(a))) if a.size else b""


@pytest.mark.parametrize("metadata", [{"format": "mlx"}, None, {"format": "pt", "note": "\u00e9\u0001"}])
def test_shard_is_what_mx_save_safetensors_writes(tmp_path, metadata):
    arrays = _arrays()
    mx.eval(list(arrays.values()))
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "mlx.safetensors"
    digest = write_shard(ours, [array_entry(k, v) for k, v in arrays.items()], metadata)
    mx.save_safetensors(str(theirs), arrays, **({"metadata": metadata} if metadata else {}))

    assert digest == sha256_file(ours)
    raw = _header(ours)
    data = sum(a.nbytes for a in arrays.values())
    assert ours.stat().st_size == 8 + len(raw) + data and theirs.stat().st_size == 8 + len(_header(theirs)) + data
    header, mlx_header = json.loads(raw), json.loads(_header(theirs))
    assert raw == json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(header) == list(mlx_header)  # the same keys in the same (sorted) order
    for name in header:  # the same entries; only where each tensor's bytes lie may differ
        if name != "__metadata__":
            assert {**header[name], "data_offsets": None} == {**mlx_header[name], "data_offsets": None}
    assert header["__metadata__"] == mlx_header["__metadata__"]

    loaded, meta = mx.load(str(ours), return_metadata=True)
    expected, expected_meta = mx.load(str(theirs), return_metadata=True)
    assert meta == expected_meta
    assert loaded.keys() == arrays.keys()
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert _bytes(loaded[name]) == _bytes(value) == _bytes(expected[name]), name
    with safe_open(str(ours), framework="numpy") as f:  # the reference reader checks offsets cover the file
        assert set(f.keys()) == set(arrays)


def test_source_ranges_are_copied_byte_for_byte(tmp_path):
    arrays = _arrays()
    source = tmp_path / "source.safetensors"
    mx.save_safetensors(str(source), arrays, metadata={"format": "mlx"})
    stored = read_header(source)
    edited = (arrays["f32"] * 3).astype(mx.float32)
    mx.eval(edited)
    entries = [source_entry(name, source, stored[name]) for name in arrays if name != "f32"]
    entries.append(array_entry("f32", edited))
    out = tmp_path / "out.safetensors"
    digest = write_shard(out, entries, {"format": "mlx"})
    assert digest == sha256_file(out)
    written = read_header(out)
    src_bytes, out_bytes = source.read_bytes(), out.read_bytes()
    for name, tensor in stored.items():
        if name != "f32":
            mine = written[name]
            assert (
                out_bytes[mine.offset : mine.offset + mine.nbytes]
                == src_bytes[tensor.offset : tensor.offset + tensor.nbytes]
            )
    assert mx.array_equal(mx.load(str(out))["f32"], edited)


def test_writeback_hint_is_harmless_where_it_cannot_help(tmp_path):
    read, write = os.pipe()
    try:
        start_writeback(write, 0, 0)  # a pipe: ESPIPE, ignored
    finally:
        os.close(read)
        os.close(write)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    safetensors_out.start_file_writeback(path)


def _expected(src, plan):
    """Every tensor the save should write: edited writers from edit_module, the rest as stored."""
    plan = plan.with_writers(discover_writers_in_dir(src))
    tensors = {}
    for f in sorted(src.glob("model*.safetensors")):
        tensors.update(mx.load(str(f)))
    out = dict(tensors)
    modules = {name.rpartition(".")[0] for name in tensors}
    for module in modules:
        leaves = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == module}
        quant = quant_params_for(module, read_config(src)) if "scales" in leaves else None
        edit = edit_module(module, leaves, plan, quant)
        if edit is not None:
            out.update({f"{module}.{k}": v for k, v in edit.tensors.items()})
    return out


@pytest.mark.parametrize("kwargs", [dict(dtype="bfloat16", num_shards=3), dict(num_shards=2, bits=4)])
def test_saved_model_has_the_edited_bytes_and_their_hashes(tiny_model, tmp_path, kwargs):
    src = tiny_model(**kwargs)
    out = tmp_path / "out"
    summary = save_ablated_model(src, out, _plan(src))
    shards = sorted(p.name for p in src.glob("model*.safetensors"))
    assert sorted(summary["output_sha256"]) == shards
    for name in shards:  # each digest is the file's (hashed as written, not read back)
        assert summary["output_sha256"][name] == sha256_file(out / name)
        assert summary["source_sha256"][name] == sha256_file(src / name)
    expected = _expected(src, _plan(src))
    saved = {}
    for name in shards:
        saved.update(mx.load(str(out / name)))
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert saved[name].dtype == value.dtype and _bytes(saved[name]) == _bytes(value), name
    # Unedited tensors are the source file's very bytes.
    for shard in shards:
        before, after = read_header(src / shard), read_header(out / shard)
        src_bytes, out_bytes = (src / shard).read_bytes(), (out / shard).read_bytes()
        for name, t in before.items():
            if mx.array_equal(expected[name], mx.load(str(src / shard))[name]):
                a = after[name]
                assert out_bytes[a.offset : a.offset + a.nbytes] == src_bytes[t.offset : t.offset + t.nbytes]
    # mlx_lm builds the model from exactly these tensors.
    model, _ = mlx_lm.load(str(out))
    params = dict(tree_flatten(model.parameters()))
    for name, value in params.items():
        assert _bytes(value) == _bytes(expected[name]), name


class _HalfWriter:
    """A file whose write puts out half of the bytes and then finds the disk full."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(memoryview(data))[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_a_real_shard_write_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    src = tiny_model(dtype="bfloat16", num_shards=3)
    before = {p.name: sha256_file(p) for p in src.iterdir() if p.is_file()}
    opened = {"n": 0}
    real_open = open

    def faulty_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            opened["n"] += 1
            if opened["n"] == 2:
                return _HalfWriter(handle)
        return handle

    monkeypatch.setattr(safetensors_out, "open", faulty_open, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UserError, match="No space left on device.*free some disk space"):
        save_ablated_model(src, work / "out", _plan(src))
    assert os.listdir(work) == []
    assert {p.name: sha256_file(p) for p in src.iterdir() if p.is_file()} == before


def test_interrupt_in_a_shard_writer_stops_every_write_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    src = tiny_model(dtype="bfloat16", num_shards=3)
    real = export_save.write_shard
    started = threading.Event()

    def interrupted(path, entries, metadata, cancel=None):
        if started.is_set():
            raise KeyboardInterrupt
        started.set()
        return real(path, entries, metadata, cancel)

    monkeypatch.setattr(export_save, "write_shard", interrupted)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        save_ablated_model(src, work / "out", _plan(src))
    assert os.listdir(work) == []


def test_a_source_shard_that_shrinks_during_the_save_is_an_error(tmp_path):
    arrays = {"a": mx.ones((1000,)), "b": mx.zeros((10,))}
    source = tmp_path / "source.safetensors"
    mx.save_safetensors(str(source), arrays)
    stored = read_header(source)
    with open(source, "r+b") as f:
        f.truncate(source.stat().st_size - 100)
    with pytest.raises(UserError, match="ended early"):
        write_shard(tmp_path / "out.safetensors", [source_entry(k, source, stored[k]) for k in arrays], None)


def test_model_io_writes_through_the_patchable_seam():
    # Fault-injection tests (tests/cli_helpers.py, test_output_safety.py) patch export_save.write_shard.
    assert export_save.write_shard is write_shard
