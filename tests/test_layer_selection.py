"""--use-layer auto and layer parsing."""

import pytest

from mlx_abliteration.core.directions import parse_layer_list, parse_use_layer
from mlx_abliteration.core.layer_selection import candidate_layers, refinement_layers
from mlx_abliteration.errors import UserError


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

    from mlx_abliteration.core.layer_selection import refusal_token_ids

    harmless = mx.log(mx.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]]))
    harmful = mx.log(mx.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.2, 0.6, 0.1]]))
    assert refusal_token_ids(harmful, harmless, k=2) == [2]
