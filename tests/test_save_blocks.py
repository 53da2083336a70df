"""Editing large matrices in row blocks (bounded save memory) gives the whole-matrix result."""

import mlx.core as mx
import pytest

import mlx_abliteration.export.save as export_save
from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.export.save import save_ablated_model
from mlx_abliteration.io.model_io import read_config


def _plan(path):
    config = read_config(path)
    mx.random.seed(3)
    return uniform_plan(mx.random.normal((config["hidden_size"],)), config["num_hidden_layers"])


def _by_module(summary):
    return {r.module: r for r in summary["reports"]}


@pytest.mark.parametrize(
    "kwargs",
    [{"arch": "llama"}, {"arch": "mixtral"}, {"arch": "llama", "bits": 4}],
    ids=["embed", "experts", "4bit-embed"],
)
def test_blockwise_edit_equals_whole(tiny_model, tmp_path, monkeypatch, kwargs):
    src = tiny_model(**kwargs)
    whole = save_ablated_model(src, tmp_path / "whole", _plan(src))
    monkeypatch.setattr(export_save, "_BLOCK_ELEMENTS", 1000)  # many blocks even on a tiny model
    blocks = save_ablated_model(src, tmp_path / "blocks", _plan(src))
    a, b = (
        mx.load(str(tmp_path / "whole" / "model.safetensors")),
        mx.load(str(tmp_path / "blocks" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        diff = mx.abs(a[name].astype(mx.float32) - b[name].astype(mx.float32)).max().item()
        assert diff <= 1e-5 * max(1.0, mx.abs(a[name].astype(mx.float32)).max().item()), name
    want, got = _by_module(whole), _by_module(blocks)
    assert want.keys() == got.keys()
    for module, report in want.items():
        assert got[module].before == pytest.approx(report.before, rel=1e-4)
        assert got[module].after == pytest.approx(report.after, rel=1e-3, abs=1e-4)
