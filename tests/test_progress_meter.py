"""Progress rates and ETAs start at the first update, so a free first batch does not make them absurd."""

import re

import pytest

from mlx_abliteration.cli.console import ProgressMeter, _bar


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_first_update_served_from_cache_does_not_count():
    clock = FakeClock()
    meter = ProgressMeter(clock)
    meter.update(32)  # half the prompts came from a cache: no time at all
    assert meter.rate is None and meter.eta(64) is None  # unknown, not "3195660 it/s"
    for done in (40, 48, 56, 64):  # then a real batch of 8 every 2.5 s
        clock.now += 2.5
        meter.update(done)
        assert meter.rate == pytest.approx(8 / 2.5)
        true_left = (64 - done) / 8 * 2.5
        assert meter.eta(64) == pytest.approx(true_left)


@pytest.mark.parametrize("first", [0, 1, 5])
def test_eta_within_a_factor_of_two_from_the_second_update(first):
    """'auto layer 1/10' arrives at once (probed already); later layers cost alike, with some jitter."""
    clock = FakeClock()
    meter = ProgressMeter(clock)
    meter.update(first)
    costs = [3.0, 2.0, 3.5, 2.5, 3.0, 2.0, 4.0, 3.0, 2.5, 3.0][: 10 - first]
    for i, cost in enumerate(costs):
        clock.now += cost
        done = first + i + 1
        meter.update(done)
        true_left = sum(costs[i + 1 :])
        eta = meter.eta(10)
        if true_left:
            assert true_left / 2 <= eta <= true_left * 2, (done, eta, true_left)
        else:
            assert eta == 0


def test_a_count_that_goes_back_restarts_the_clock():
    clock = FakeClock()
    meter = ProgressMeter(clock)
    meter.update(0)
    clock.now += 10
    meter.update(5)
    meter.update(1)  # the stage started over (a new pass under the same name)
    assert meter.rate is None
    clock.now += 1
    meter.update(3)
    assert meter.rate == pytest.approx(2.0)


def test_the_drawn_bar_shows_the_meter_rate_and_eta():
    clock = FakeClock()
    meter = ProgressMeter(clock)
    bar = _bar(64, "baseline: harmful", meter)
    bar.disable = False
    try:
        meter.update(32)
        bar.n = 32
        text = str(bar)
        assert "?it/s" in text and "<?" in text  # unknown, not millions of it/s
        clock.now += 2.5
        meter.update(40)
        bar.n = 40
        text = str(bar)
        assert re.search(r"40/64 \[00:02<00:07, +3\.20it/s\]", text), text
    finally:
        bar.close()
