"""--use-layer auto and layer parsing."""

import pytest

from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.layer_selection import refinement_layers
from mlx_abliteration.probe.directions import candidate_layers, parse_layer_list, parse_use_layer


def test_candidates_cover_the_middle_of_the_network():
    layers = candidate_layers(list(range(28)), 28)
    assert layers[0] == 7 and max(layers) < 23 and len(layers) <= 8
    assert refinement_layers(9, list(range(28)), set(layers)) == [8, 10]
    assert candidate_layers([0, 1], 28) == [0, 1]  # nothing probed in the middle: use what was probed


def test_parse_layer_lists():
    assert parse_layer_list("all", 6) == list(range(6))
    assert parse_layer_list("1-3", 6) == [1, 2, 3]
    assert parse_layer_list("0,4", 6) == [0, 4]
    assert parse_layer_list("-2--1", 6) == [4, 5]
    assert parse_layer_list("0.5-1.0", 5) == [2, 3, 4]
    for bad in ("2-40", "x", "3-1"):
        with pytest.raises(UserError):
            parse_layer_list(bad, 6)


def test_parse_use_layer():
    assert parse_use_layer("auto", 10) == "auto"
    assert parse_use_layer("-1", 10) == 9
    assert parse_use_layer("0.5", 11) == 5
    assert parse_use_layer(3, 10) == 3
    for bad in ("10", "1.5", "nan", "abc"):
        with pytest.raises(UserError):
            parse_use_layer(bad, 10)


def test_refusal_tokens_are_those_rising_on_harmful_prompts():
    import mlx.core as mx

    from mlx_abliteration.evaluation.layer_selection import refusal_token_ids

    harmless = mx.log(mx.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]]))
    harmful = mx.log(mx.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.2, 0.6, 0.1]]))
    assert refusal_token_ids(harmful, harmless, k=2) == [2]


def test_auto_scores_stay_finite_when_a_token_has_zero_probability(tiny_model, monkeypatch):
    """A vocabulary slot the model never emits (log-prob -inf, e.g. padded vocabularies) adds 0 to the KL, not NaN."""
    import math

    import mlx.core as mx

    import mlx_abliteration.evaluation.layer_selection as layer_selection
    from mlx_abliteration.edit.orthogonalize import uniform_plan
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.directions import RefusalDirections

    model, tokenizer, config = load_model(tiny_model(num_layers=4))
    real = layer_selection.first_token_logprobs

    def never_token_zero(*args, **kwargs):
        logp = real(*args, **kwargs)
        return mx.where(mx.arange(logp.shape[-1]) == 0, -mx.inf, logp)

    monkeypatch.setattr(layer_selection, "first_token_logprobs", never_token_zero)
    rows = mx.random.normal((4, config["hidden_size"]), key=mx.random.key(0))
    directions = RefusalDirections(
        list(range(4)), rows / mx.linalg.norm(rows, axis=-1, keepdims=True), [], "mean-diff", 4
    )
    layer, scores = layer_selection.select_layer_auto(
        model,
        tokenizer,
        directions,
        lambda layer: uniform_plan(directions.direction(layer), 4),
        ["How do I pick a lock?", "Write malware."],
        ["How do I bake bread?", "Name a color."],
    )
    assert scores and all(math.isfinite(s.kl) and s.kl > 0 for s in scores)
    assert layer in {s.layer for s in scores}
