"""Trials by projecting writer outputs give the logits of the edited weights, and fall back where they cannot."""

import mlx.core as mx
import pytest

from mlx_abliteration.edit.orthogonalize import uniform_plan
from mlx_abliteration.edit.projected_trial import ProjectedTrial, WriterNotCalled, projectable
from mlx_abliteration.edit.revertible_edit import TrialEditor
from mlx_abliteration.edit.trials import Trials
from mlx_abliteration.probe.capture import decoder_layers
from mlx_abliteration.probe.writer_discovery import model_writers
from tests.arch_zoo import build_tiny_model

IDS = mx.array([[1, 5, 7, 9, 11, 13, 17, 19]])


def _plan(model, strength=1.0, norm_preserve=False, seed=3):
    writers = model_writers(model)
    width = next(m.weight.shape[-1] for p, m in model.named_modules() if p in writers and writers[p].rows)
    r = mx.random.normal((width,), key=mx.random.key(seed))
    return uniform_plan(r, len(decoder_layers(model)), strength, norm_preserve=norm_preserve).with_writers(writers)


def _edited_logits(model, plan):
    editor = TrialEditor(model, ())
    editor.apply(plan)
    try:
        return model(IDS)
    finally:
        editor.restore()


# Dense, biased writers (gpt2), MoE experts (qwen3_moe), post-norm writers
# (gemma3_text), an embedding tied to the output head (llama config ties).
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe", "gemma3_text"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_projected_outputs_equal_the_edited_weights(model_type, strength):
    model, _ = build_tiny_model(model_type)
    model.set_dtype(mx.float32)
    plan = _plan(model, strength)
    assert projectable(model, plan)
    base = model(IDS)
    trial = ProjectedTrial(model)
    with trial.applied(plan):
        projected = model(IDS)
    trial.check_calls()
    edited = _edited_logits(model, plan)
    effect = float(mx.abs(edited - base).max())
    assert effect > 0.05  # the edit changes the logits, so equality below means something
    assert float(mx.abs(projected - edited).max()) < 1e-4 * max(1.0, effect)
    assert mx.array_equal(model(IDS), base).item()  # nothing left behind


def test_a_tied_output_head_is_projected_too(tiny_model):
    from mlx_abliteration.io.model_io import load_model

    model, _, _ = load_model(tiny_model(tie=True))
    assert not any(p.endswith("lm_head") for p, _ in model.named_modules())
    plan = _plan(model)
    embed_only = uniform_plan(plan.embed_direction, len(decoder_layers(model)), 0.0)
    embed_only.strengths["embed"] = [1.0]
    embed_only = embed_only.with_writers(plan.writers)
    trial = ProjectedTrial(model)
    with trial.applied(embed_only):
        projected = model(IDS)
    assert float(mx.abs(projected - _edited_logits(model, embed_only)).max()) < 1e-4
    assert "as_linear" not in model.model.embed_tokens.__dict__  # the head is restored


def test_edits_that_are_not_projections_are_not_projected(tiny_model):
    from mlx_abliteration.io.model_io import load_model

    model, _ = build_tiny_model("llama")
    assert not projectable(model, _plan(model, norm_preserve=True))  # rescales W's columns
    quantized, _, _ = load_model(tiny_model(bits=4), dequantize=False)
    assert not projectable(quantized, _plan(quantized))  # the saved edit is requantized


def test_trials_edit_the_weights_when_a_writer_is_not_called():
    model, _ = build_tiny_model("llama")
    model.set_dtype(mx.float32)
    plan = _plan(model)
    expected = _edited_logits(model, plan)
    trial = ProjectedTrial(model)
    path = next(p for p, w in plan.writers.items() if not w.rows)
    with trial.applied(plan):
        model(IDS)
    trial.check_calls()
    trial.calls.pop(path)  # as if its weights had reached the output without a call
    with pytest.raises(WriterNotCalled):
        trial.check_calls()

    trials = Trials(model, ())
    calls = []

    def measure():
        calls.append(trials.project)
        out = model(IDS)
        if trials.project:  # the first try: pretend one writer was bypassed
            trials.projected.calls.pop(path)
        return out

    result = trials.measure(plan, measure)
    assert calls == [True, False]  # projected, found wanting, then measured on the edited weights
    assert float(mx.abs(result - expected).max()) < 1e-4
    assert trials.measure(plan, lambda: model(IDS)) is not None and trials.project is False
