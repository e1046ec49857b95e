"""Notebook 04 (one joint GRPO step, by hand), executed in smoke mode through papermill."""

import math

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "04_grpo_update"


def test_keeps_figures(figures):
    assert figures >= 3  # samples, reward curves, policy update, training curves


def test_hand_computations_match_the_library(results):
    assert results["num_rollouts"] == 10  # 2 requests x G = 5
    assert math.isclose(results["loss_hand"], results["loss_library"], abs_tol=1e-6)
    assert math.isclose(results["loss_hand_pass2"], results["loss_library_pass2"], abs_tol=1e-6)
    # First pass: ratio 1 and centred advantages, so the loss value is ~0.
    assert abs(results["loss_library"]) < 1e-5
    assert results["advantage_group_sum_abs_max"] < 1e-4
    assert 0 < results["advantage_abs_max"] <= 2.0  # (G - 1) / sqrt(G) bounds a normalised group of 5
    assert results["trainer_matches_hand"] == 1
    assert results["trainer_max_weight_diff"] < 1e-4
    assert 0.0 <= results["clip_fraction_pass2"] <= 1.0


def test_gradient_reaches_every_part(results):
    for part in ("stage1", "stage2", "budget_encoder"):
        assert results[f"grad_norm_{part}"] > 0
    assert results["grad_norm_total"] > 0


def test_recorded_values_are_sane(results):
    assert results["reward_min"] <= results["reward_mean"] <= results["reward_max"]
    assert 0.0 <= results["rollout_accuracy"] <= 1.0
    assert 0.0 <= results["prob_sign_agreement"] <= 1.0
    assert 0.0 <= results["reward_pair_order_agreement"] <= 1.0
    keys = set(results["trainer_metrics_keys"].split(","))
    assert {"reward_mean", "loss", "grad_norm", "clip_fraction", "zero_std_fraction", "forwards_per_request"} <= keys
    assert results["trainer_steps"] == 3  # the hand-checked step + 2 in smoke mode


def test_quality_one_step_moves_the_policy_along_the_advantages(results):
    """One Adam step should raise most positive-advantage rollouts and lower most negative ones."""
    assert results["prob_sign_agreement"] >= 0.6
