"""The plane's pieces on hand-made numbers: the hull, the oracles, the price search, the shares."""

import math

import pytest
import torch

from knoblib.correctness import Correctness
from knoblib.knobs import KnobConfig, KnobSpace
from knoblib.latency import LatencyTable
from knoblib.plane import (
    HullMix,
    PlanePoint,
    family_mix,
    find_price,
    gain_share,
    oracle_for_budget,
    oracle_for_target,
    saving_share,
    shares,
    static_front,
    upper_hull,
)

SPACE = KnobSpace.for_model(8, 4)
CHEAP, MID, FULL = KnobConfig("low", 1, 2, 6), KnobConfig("medium", 1, 3, 7), KnobConfig("high", 1, 4, 8)


@pytest.fixture
def table():
    latency = {k: 50.0 for k in SPACE}
    latency.update({CHEAP: 10.0, MID: 20.0, FULL: 40.0})
    return LatencyTable(latency_ms=latency, knob_space=SPACE.as_dict())


def test_upper_hull_keeps_the_concave_rising_part():
    points = [(10, 0.5), (20, 0.6), (30, 0.9), (40, 0.95), (50, 0.94), (25, 0.5)]
    assert upper_hull(points) == [0, 2, 3]  # (20, 0.6) lies under the chord from 10 to 30; 50 is lower than 40


def test_static_front_and_the_random_mix(table):
    accuracy = {k: 0.0 for k in SPACE}
    accuracy.update({CHEAP: 0.5, MID: 0.6, FULL: 0.9})
    assert static_front(accuracy, table) == [CHEAP, MID, FULL]
    mix = HullMix.from_accuracy(accuracy, table)
    assert mix.vertices == [CHEAP, FULL]  # MID (0.6 at 20 ms) is under the chord 0.5 -> 0.9
    assert mix.weights(25.0) == [(CHEAP, pytest.approx(0.5)), (FULL, pytest.approx(0.5))]
    assert mix.weights(5.0) == [(CHEAP, 1.0)] and mix.weights(99.0) == [(FULL, 1.0)]
    draws = mix.choose(25.0, 2000, seed=1)
    assert draws == mix.choose(25.0, 2000, seed=1)  # seeded
    mean = sum(table.latency(k) for k in draws) / len(draws)
    assert mean == pytest.approx(25.0, rel=0.05)


def correctness_of(rows: list[list[bool]]) -> Correctness:
    configs = [CHEAP, MID, FULL]
    n = len(rows)
    return Correctness(torch.tensor(rows), [str(i) for i in range(n)], ["color"] * n, configs, "test")


def test_oracle_for_a_budget_takes_the_cheapest_right_configuration_that_fits(table):
    c = correctness_of([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    # Everything fits: three of four are answerable; latencies 10, 20, 40 and the cheapest 10 for the last.
    assert oracle_for_budget(c, table, 45.0, 0.5) == (pytest.approx(0.75), pytest.approx(20.0))
    # At 25 ms FULL does not fit: the third question is lost and served the cheapest.
    assert oracle_for_budget(c, table, 25.0, 0.5) == (pytest.approx(0.5), pytest.approx((10 + 20 + 10 + 10) / 4))


def test_oracle_for_a_target_buys_the_cheapest_right_answers_first(table):
    c = correctness_of([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    assert oracle_for_target(c, table, 10.0) == (pytest.approx(0.25), pytest.approx(10.0))
    # 2.5 ms of mean latency to spend per question = 10 ms in all: the second question's +10.
    assert oracle_for_target(c, table, 12.5) == (pytest.approx(0.5), pytest.approx(12.5))
    assert oracle_for_target(c, table, 100.0) == (pytest.approx(0.75), pytest.approx((10 + 20 + 40 + 10) / 4))


def test_find_price_hits_the_target():
    # A policy whose mean latency falls linearly with the price: 40 ms at 0, 10 ms at 3.
    latency = lambda price: max(10.0, 40.0 - 10.0 * price)  # noqa: E731
    assert find_price(latency, 25.0, max_price=5.0) == pytest.approx(1.5, abs=1e-6)
    assert find_price(latency, 50.0, max_price=5.0) == 0.0
    assert find_price(latency, 5.0, max_price=5.0) == 5.0
    with pytest.raises(ValueError, match="target_ms"):
        find_price(latency, float("nan"), max_price=5.0)
    with pytest.raises(ValueError, match="max_price"):
        find_price(latency, 20.0, max_price=0.0)


def test_family_mix_spends_where_a_family_needs_it(table):
    accuracy = {k: {f: 0.0 for f in ("all", "color", "mark", "binding", "count")} for k in SPACE}
    accuracy[CHEAP] = {"all": 0.6, "color": 1.0, "mark": 0.25, "binding": 0.5, "count": 0.6}
    accuracy[FULL] = {"all": 0.95, "color": 1.0, "mark": 1.0, "binding": 1.0, "count": 0.8}
    mix = family_mix(accuracy, table, price=0.5)  # 30 ms more costs 0.5 * 30 / 40 = 0.375
    assert mix == {"color": CHEAP, "mark": FULL, "binding": FULL, "count": CHEAP}
    assert family_mix(accuracy, table, price=0.0)["count"] == FULL


def test_shares():
    assert saving_share(30.0, 27.0, 20.0) == pytest.approx(0.3)
    assert saving_share(30.0, 27.0, 30.0) is None
    assert gain_share(0.8, 0.85, 0.9) == pytest.approx(0.5)
    assert gain_share(0.9, 0.95, 0.9) is None
    points = [
        PlanePoint("lookup table", "budget", 30, 0.9, 30.0, 0.0),
        PlanePoint("per-request oracle", "budget", 30, 0.95, 20.0, 0.0),
        PlanePoint("controller", "budget", 30, 0.9, 27.0, 0.0),
        PlanePoint("static hull (random mix)", "target", 25, 0.8, 25.0, 0.0),
        PlanePoint("per-request oracle", "target", 25, 0.9, 25.0, 0.0),
        PlanePoint("controller", "target", 25, 0.85, 25.0, 0.0, price=1.0, accuracy_vs_baseline=[0.05, 0.0, 0.1]),
    ]
    result = shares(points)["controller"]
    assert result["oracle_saving_share"] == pytest.approx(0.3) and result["oracle_gain_share"] == pytest.approx(0.5)
    assert not math.isnan(result["oracle_gain_share"])
