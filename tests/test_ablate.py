"""Orthogonalization math on real MLX arrays: right side, right matrices, exact revert."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_abliteration.config.defaults import DEFAULT_TARGETS, check_strength
from mlx_abliteration.edit.in_memory import apply_plan, get_ablated_parameters
from mlx_abliteration.edit.orthogonalize import edit_module, orthogonalize_embedding, orthogonalize_writer, uniform_plan
from mlx_abliteration.edit.revertible_edit import TrialEditor
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.writer_discovery import model_writers
from mlx_abliteration.runtime.quantization import QuantParams

READERS = ("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "norm", "c_attn", "c_fc", "gate.weight")


def _unit(h, seed=1):
    r = mx.random.normal((h,), key=mx.random.key(seed))
    return r / mx.linalg.norm(r)


def test_writer_math_removes_component_on_the_output_side():
    h, d_in = 16, 24
    w = mx.random.normal((h, d_in))  # (out = residual, in)
    r = _unit(h)
    edited = orthogonalize_writer(w, r, 1.0)
    assert float(mx.linalg.norm(r @ edited).item()) <= 1e-5 * float(mx.linalg.norm(r @ w).item())
    # Inputs orthogonal to nothing: the edit is the projector (I - r r^T) applied to W.
    # The reference is computed in float64 with NumPy: a float32 matmul on MLX's
    # CUDA backend runs at TF32 precision (MLX_ENABLE_TF32 defaults to 1) and
    # would itself be ~1e-3 off; the edit (a matrix-vector product) is not.
    rr, ww = np.array(r, dtype=np.float64), np.array(w, dtype=np.float64)
    reference = (np.eye(h) - np.outer(rr, rr)) @ ww
    assert np.allclose(np.array(edited), reference, atol=1e-5)


def test_square_matrix_is_edited_on_the_residual_side_only():
    h = 16
    w = mx.random.normal((h, h))
    r = _unit(h)
    edited = orthogonalize_writer(w, r, 1.0)
    assert float(mx.linalg.norm(r @ edited).item()) < 1e-5
    assert float(mx.linalg.norm(edited @ r).item()) > 1e-2  # not the input side


def test_embedding_rows_lose_the_component_and_partial_strength_scales():
    e = mx.random.normal((50, 16))
    r = _unit(16)
    assert float(mx.linalg.norm(orthogonalize_embedding(e, r, 1.0) @ r).item()) <= 1e-5 * float(
        mx.linalg.norm(e @ r).item()
    )
    half = orthogonalize_embedding(e, r, 0.5)
    assert mx.allclose(half @ r, 0.5 * (e @ r), atol=1e-5)


def test_norm_preserving_keeps_column_norms():
    w = mx.random.normal((16, 8))
    r = _unit(16)
    edited = orthogonalize_writer(w, r, 1.0, norm_preserve=True)
    assert mx.allclose(mx.linalg.norm(edited, axis=0), mx.linalg.norm(w, axis=0), rtol=1e-5)
    # Direction still removed (rescaling a column does not bring r back).
    assert float(mx.linalg.norm(r @ edited).item()) < 1e-4


@pytest.mark.parametrize("strength", [-1, float("nan"), "abc", float("inf")])
def test_bad_strength_is_a_user_error(strength):
    with pytest.raises(UserError):
        check_strength(strength)


def _flat(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize(
    "kwargs", [dict(arch="llama"), dict(arch="qwen2", tie=False), dict(arch="mixtral"), dict(arch="gpt2")]
)
def test_float32_model_every_writer_orthogonal_readers_untouched(tiny_model, kwargs):
    model, _, config = load_model(tiny_model(**kwargs))
    h = config.get("hidden_size") or config["n_embd"]
    r = _unit(h)
    before = _flat(model)
    apply_plan(model, uniform_plan(r, len(model.layers)))
    after = _flat(model)
    writers = model_writers(model)
    edited = set()
    for name, w in before.items():
        new = after[name]
        writer = writers.get(name.rpartition(".")[0])
        if writer is None:
            assert mx.array_equal(w, new), f"{name} is not a writer but changed"
            continue
        edited.add(name)
        leaf = name.rpartition(".")[2]
        if leaf == "bias":
            assert abs(float((new * r).sum().item())) <= 1e-5 * max(abs(float((w * r).sum().item())), 1e-3)
        elif writer.rows:
            assert float(mx.linalg.norm(new @ r).item()) <= 1e-5 * float(mx.linalg.norm(w @ r).item())
        else:
            # Per expert for 3-D MoE weights: r^T W_e = 0 for each e.
            per = mx.linalg.norm(
                mx.matmul(r[None, :], new).reshape(-1, new.shape[-1]) if new.ndim == 2 else mx.matmul(r[None, :], new),
                axis=-1,
            )
            ref = mx.linalg.norm(mx.matmul(r[None, :], w) if w.ndim == 3 else (r @ w)[None], axis=-1)
            assert bool(mx.all(per <= 1e-5 * ref).item()), name
    assert any("o_proj" in n or "attn.c_proj" in n for n in edited)
    assert any("down_proj" in n or "mlp.c_proj" in n for n in edited)
    if kwargs["arch"] == "gpt2":
        assert any(n.endswith("c_proj.bias") for n in edited)


def test_bf16_model_keeps_dtype_and_removes_up_to_rounding(tiny_model):
    model, _, config = load_model(tiny_model(dtype="bfloat16"), compute_dtype=None)
    r = _unit(config["hidden_size"])
    params = get_ablated_parameters(model, r)
    original = _flat(model)
    for name, new in params.items():
        assert new.dtype == mx.bfloat16
        w = original[name].astype(mx.float32)
        new = new.astype(mx.float32)
        comp = (new @ r) if "embed" in name else (r @ new)
        ref = (w @ r) if "embed" in name else (r @ w)
        # bf16 keeps 8 mantissa bits: rounding each entry re-adds at most
        # ~2^-8 of the entry, so the surviving component is < 1% of the original.
        assert float(mx.linalg.norm(comp).item()) <= 1e-2 * float(mx.linalg.norm(ref).item()), name


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_edit_reports_residual_and_higher_precision_fixes_it(tiny_model, bits):
    model, _, config = load_model(tiny_model(bits=bits), dequantize=False)
    module = model.layers[1].self_attn.o_proj
    r = _unit(config["hidden_size"])
    plan = uniform_plan(r, len(model.layers)).with_writers(model_writers(model))
    leaves = {k: v for k, v in module.items() if isinstance(v, mx.array)}
    quant = QuantParams(module.group_size, module.bits, module.mode)
    edit = edit_module("model.layers.1.self_attn.o_proj", leaves, plan, quant)
    assert set(edit.tensors) == {"weight", "scales", "biases"}
    assert edit.tensors["weight"].dtype == mx.uint32
    stored = mx.dequantize(
        edit.tensors["weight"], edit.tensors["scales"], edit.tensors["biases"], group_size=quant.group_size, bits=bits
    )
    original = mx.dequantize(module.weight, module.scales, module.biases, group_size=quant.group_size, bits=bits)
    measured = float(mx.linalg.norm(r @ stored).item()) / float(mx.linalg.norm(r @ original).item())
    assert edit.report.residual == pytest.approx(measured, rel=1e-4)
    assert 0 < measured < (0.5 if bits == 4 else 0.1)  # the edit happened; requantizing loses part of it
    precise = edit_module("model.layers.1.self_attn.o_proj", leaves, plan, quant, edited_precision="float32")
    assert set(precise.tensors) == {"weight"} and precise.dequantized
    assert precise.report.residual <= 1e-3


def test_trial_editor_restores_every_weight_bit_for_bit(tiny_model):
    for kwargs, dense in (
        (dict(), True),
        (dict(bits=4, embedding_bits=8), True),
        (dict(bits=4, embedding_bits=8), False),
    ):
        model, _, config = load_model(tiny_model(**kwargs), dequantize=dense)
        before = _flat(model)
        editor = TrialEditor(model, DEFAULT_TARGETS)
        editor.apply(uniform_plan(_unit(config["hidden_size"]), len(model.layers), 0.7))
        assert not all(mx.array_equal(before[k], v) for k, v in _flat(model).items())
        editor.restore()
        assert all(mx.array_equal(before[k], v) for k, v in _flat(model).items())


def test_direction_of_wrong_size_is_a_user_error(tiny_model):
    model, _, _ = load_model(tiny_model())
    with pytest.raises(UserError, match="does not belong"):
        apply_plan(model, uniform_plan(_unit(7), len(model.layers)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantized_model_runs_dense_on_cpu_and_edits_match_the_saved_file(tiny_model, tmp_path, dtype):
    import mlx.nn as nn

    from mlx_abliteration.export.save import save_ablated_model

    src = tiny_model(bits=4, embedding_bits=8, dtype=dtype)
    auto, _, _ = load_model(src)
    # The automatic choice: dense float32 twins of the quantized layers on the
    # CPU (no fast quantized kernels there); GPUs keep the quantized layers.
    on_cpu = mx.default_device() == mx.cpu
    assert isinstance(auto.layers[0].self_attn.o_proj, nn.QuantizedLinear) is not on_cpu
    del auto
    # The twins themselves, asked for explicitly so they are checked on any device.
    model, tok, config = load_model(src, compute_dtype=mx.float32, dequantize=True)
    o_proj = model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, nn.Linear) and o_proj._storage_quant.bits == 4
    assert model.model.embed_tokens._storage_quant.bits == 8
    packed, _, _ = load_model(src, dequantize=False)
    q = packed.layers[0].self_attn.o_proj
    reference = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
    assert mx.allclose(o_proj.weight, reference, atol=1e-3, rtol=1e-3)  # fp16 rounding of the dequantized values
    x = mx.array([tok.encode("hello there")])
    if dtype == "float32":
        assert mx.allclose(model(x), packed(x), atol=1e-3)
    plan = uniform_plan(_unit(config["hidden_size"]), len(model.layers))
    reports = apply_plan(model, plan)
    assert all(r.quantized for r in reports)
    save_ablated_model(src, tmp_path / "out", plan)
    saved, _, _ = load_model(
        tmp_path / "out", compute_dtype=mx.float32, dequantize=True
    )  # dense twins of the saved, requantized weights
    for (name, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(saved.parameters())):
        assert mx.allclose(a, b, atol=1e-6), name


def test_apply_plan_replaces_one_writer_at_a_time(tiny_model):
    """The in-memory edit never holds an edited copy of every writer at once (+2.7 GB on a 1.5B model)."""
    from mlx_abliteration.edit.in_memory import writer_modules

    model, _, _ = load_model(tiny_model(num_layers=8, hidden_size=256))
    writer_bytes = [sum(v.nbytes for _, v in tree_flatten(m.parameters())) for _, m in writer_modules(model)]
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    apply_plan(model, uniform_plan(_unit(256), 8, 1.0))
    assert mx.get_peak_memory() - base < sum(writer_bytes) / 2, (mx.get_peak_memory() - base, writer_bytes)
    changed = [k for k, v in tree_flatten(model.parameters()) if not np.array_equal(np.array(v), before[k])]
    assert len(changed) == len(writer_bytes)


def test_in_memory_embedding_edit_in_row_blocks_equals_the_whole(tiny_model, monkeypatch):
    """apply_plan edits a dense embedding a block of rows at a time (its float32 temporaries were the peak of a run)."""
    import mlx_abliteration.edit.in_memory as in_memory
    from mlx_abliteration.edit.in_memory import apply_plan
    from mlx_abliteration.io.model_io import load_model

    path = tiny_model(tie=False, dtype="bfloat16")
    whole, _, config = load_model(path)
    blocked, _, _ = load_model(path)
    plan = uniform_plan(_unit(config["hidden_size"]), len(whole.model.layers), 0.8)
    reports = {r.module: r for r in apply_plan(whole, plan, storage_dtype=mx.bfloat16)}
    monkeypatch.setattr(in_memory, "EMBED_BLOCK_ELEMENTS", 7 * config["hidden_size"])  # 7 rows, a ragged last block
    blocks = {r.module: r for r in apply_plan(blocked, plan, storage_dtype=mx.bfloat16)}
    table = "model.embed_tokens"
    assert mx.array_equal(whole.model.embed_tokens.weight, blocked.model.embed_tokens.weight).item()
    assert blocks[table].before == pytest.approx(reports[table].before, rel=1e-5)
    assert blocks[table].after == pytest.approx(reports[table].after, rel=1e-3, abs=1e-6)
