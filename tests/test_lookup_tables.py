"""An input-only embedding stays in its stored half precision on the CPU: same logits, same edits, half the bytes."""

import mlx.core as mx
import pytest

from mlx_abliteration.edit.in_memory import apply_plan
from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.runtime.lookup_tables import WideningEmbedding

IDS = mx.array([[1, 5, 7, 9, 11]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_untied_half_table_is_kept_and_widened_on_lookup(tiny_model, dtype):
    model, _, _ = load_model(tiny_model(tie=False, dtype=dtype))
    table = model.model.embed_tokens
    assert isinstance(table, WideningEmbedding) and table.weight.dtype == getattr(mx, dtype)
    assert model.lm_head.weight.dtype == mx.float32  # the head is a matmul: float32
    logits = model(IDS)
    assert logits.dtype == mx.float32

    wide = mx.array(table.weight.astype(mx.float32))
    table.weight = wide  # the float32 table the model had before: identical logits
    assert mx.array_equal(model(IDS), logits).item()


def test_tied_and_float32_tables_are_left_alone(tiny_model):
    tied, _, _ = load_model(tiny_model(tie=True, dtype="bfloat16"))
    assert type(tied.model.embed_tokens).__name__ == "Embedding" and tied.model.embed_tokens.weight.dtype == mx.float32
    f32, _, _ = load_model(tiny_model(tie=False, dtype="float32"))
    assert type(f32.model.embed_tokens).__name__ == "Embedding"


def test_in_memory_edit_of_a_compact_table_equals_the_float32_edit(tiny_model):
    path = tiny_model(tie=False, dtype="bfloat16")
    compact, _, config = load_model(path)
    wide, _, _ = load_model(path)
    wide.model.embed_tokens.weight = wide.model.embed_tokens.weight.astype(mx.float32)
    r = mx.random.normal((config["hidden_size"],), key=mx.random.key(2))
    plan = uniform_plan(r, len(compact.model.layers), 1.0)
    apply_plan(compact, plan, storage_dtype=mx.bfloat16)
    apply_plan(wide, plan, storage_dtype=mx.bfloat16)
    assert compact.model.embed_tokens.weight.dtype == mx.bfloat16
    assert mx.array_equal(compact.model.embed_tokens.weight.astype(mx.float32), wide.model.embed_tokens.weight).item()
    assert mx.array_equal(compact(IDS), wide(IDS)).item()
