"""Tests for knoblib.reward."""

import math

import pytest
import torch

from knoblib.reward import RewardConfig, compute_reward, original_reward


def reward_of(correct, latency, budget, cfg=None):
    reward, _ = compute_reward(torch.tensor([correct]), torch.tensor([latency]), torch.tensor([budget]), cfg)
    return reward.item()


def test_hand_computed_values():
    # Under budget, correct: 1 + 0.03 * (1 - 80/100).
    assert reward_of(True, 80.0, 100.0) == pytest.approx(1.006)
    # Under budget, wrong: only the saving bonus.
    assert reward_of(False, 80.0, 100.0) == pytest.approx(0.006)
    # Over budget, correct: 1 - 1 - 2 * (120 - 100) / 100.
    assert reward_of(True, 120.0, 100.0) == pytest.approx(-0.4)
    # Over budget, wrong.
    assert reward_of(False, 150.0, 100.0) == pytest.approx(-2.0)
    # Exactly at the budget is not a violation and saves nothing.
    assert reward_of(True, 100.0, 100.0) == pytest.approx(1.0)


def test_parts_sum_to_reward():
    correct = torch.tensor([True, False, True, False])
    latency = torch.tensor([50.0, 90.0, 130.0, 300.0])
    budget = torch.tensor([100.0, 100.0, 100.0, 200.0])
    reward, parts = compute_reward(correct, latency, budget)
    assert set(parts) == {"accuracy", "violation", "overshoot", "saving", "price"}
    torch.testing.assert_close(reward, sum(parts.values()))
    torch.testing.assert_close(parts["violation"], torch.tensor([0.0, 0.0, -1.0, -1.0]))
    torch.testing.assert_close(parts["overshoot"], torch.tensor([0.0, 0.0, -0.6, -1.0]))


def test_custom_weights():
    cfg = RewardConfig(correct_weight=2.0, violation_penalty=3.0, overshoot_weight=0.0, saving_bonus=0.0)
    assert reward_of(True, 80.0, 100.0, cfg) == pytest.approx(2.0)
    assert reward_of(True, 120.0, 100.0, cfg) == pytest.approx(-1.0)


def test_a_violation_never_pays_at_default_weights():
    budget = torch.full((2000,), 100.0)
    latency = torch.linspace(1.0, 400.0, 2000)
    correct = torch.arange(2000) % 2 == 0
    reward, _ = compute_reward(correct, latency, budget)
    violating = latency > budget
    best_violation = reward[violating].max()
    # Below every correct answer within budget, and never above a wrong one within budget.
    assert best_violation < reward[~violating & correct].min()
    assert best_violation <= reward[~violating & ~correct].min()


@pytest.mark.parametrize(
    "correct, latency, budget, match",
    [
        ([True], [50.0], [0.0], "budget_ms"),
        ([True], [50.0], [-10.0], "budget_ms"),
        ([True], [50.0], [float("nan")], "budget_ms"),
        ([True], [-1.0], [100.0], "latency_ms"),
        ([True], [float("inf")], [100.0], "latency_ms"),
        ([True, False], [50.0], [100.0], "shapes differ"),
        ([[True]], [[50.0]], [[100.0]], "1-D"),
        ([2.0], [50.0], [100.0], "correct"),
    ],
)
def test_bad_inputs_raise(correct, latency, budget, match):
    with pytest.raises(ValueError, match=match):
        compute_reward(torch.tensor(correct), torch.tensor(latency), torch.tensor(budget))


@pytest.mark.parametrize(
    "field, value",
    [("correct_weight", 0.0), ("violation_penalty", -1.0), ("overshoot_weight", float("nan")), ("saving_bonus", True)],
)
def test_reward_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**{field: value})


def test_original_reward_hand_computed():
    correct = torch.tensor([True, False])
    latency = torch.tensor([80.0, 120.0])
    budget = torch.tensor([100.0, 100.0])
    complexity = torch.tensor([0.5, 1.0])
    reward, parts = original_reward(correct, latency, budget, complexity)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    under = 1 - 0.5 * sigmoid(10 * (0.8 - 1)) - 0 - 0.05 * 0.5 + 0.1 * 0.2
    over = 0 - 0.5 * sigmoid(10 * (1.2 - 1)) - 10 * 0.2**2 - 0.05 * 1.0 + 0
    torch.testing.assert_close(reward, torch.tensor([under, over]))
    torch.testing.assert_close(reward, sum(parts.values()))


def test_original_reward_checks_complexity():
    args = (torch.tensor([True]), torch.tensor([50.0]), torch.tensor([100.0]))
    with pytest.raises(ValueError, match="complexity"):
        original_reward(*args, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="complexity"):
        original_reward(*args, torch.tensor([0.5, 0.5]))


def test_the_latency_price_and_no_budget():
    cfg = RewardConfig(saving_bonus=0.03)
    correct = torch.tensor([1.0, 1.0, 0.0])
    latency = torch.tensor([20.0, 40.0, 20.0])
    budget = torch.tensor([float("inf"), float("inf"), 30.0])
    price = torch.tensor([0.5, 0.5, 0.0])
    reward, parts = compute_reward(correct, latency, budget, cfg, price, reference_ms=40.0)
    # No budget: no violation, no saving; the price pays lambda * L / L_full.
    assert parts["price"].tolist() == pytest.approx([-0.25, -0.5, 0.0])
    assert parts["saving"].tolist() == pytest.approx([0.0, 0.0, 0.03 * (1 - 20 / 30)])
    assert reward.tolist() == pytest.approx([0.75, 0.5, 0.01])
    with pytest.raises(ValueError, match="reference_ms"):
        compute_reward(correct, latency, budget, cfg, price)
    with pytest.raises(ValueError, match="price"):
        compute_reward(correct, latency, budget, cfg, torch.tensor([-1.0, 0.0, 0.0]), reference_ms=40.0)
    with pytest.raises(ValueError, match="budget_ms"):
        compute_reward(correct, latency, torch.tensor([float("nan"), 1.0, 1.0]), cfg)
