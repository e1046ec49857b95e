"""Notebook 05 (joint training, Mode A vs Mode B, evaluation), executed in smoke mode through papermill."""

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "05_gpu_training"
MODES = ("b", "a_resumable", "a_naive")
POLICIES = ("controller_mode_b", "controller_mode_a", "lookup_table", "random_feasible", "full_model")


def test_keeps_figures(figures):
    assert figures >= 4  # live curves (x2), mode comparison, forward counts, sweep


def test_device_and_resume(results):
    assert results["device_requested"] == "auto"
    assert results["device_used"] in ("cpu", "cuda", "cuda:0")
    assert results["resume_identical"] == 1


def test_modes_count_forwards(results):
    assert results["mode_b_forwards_per_request"] == 5  # G full forwards
    assert results["mode_a_resumable_forwards_per_request"] == 5  # G forwards that pause at p
    assert results["mode_a_naive_forwards_per_request"] == 10  # G partial + G full
    for mode in MODES:
        assert results[f"mode_{mode}_mean_step_s"] > 0
        assert results[f"mode_{mode}_early_step_s"] > 0
        assert results[f"mode_{mode}_final_reward"] > -10


def test_live_sweep_structure(results):
    assert results["live_sweep_budgets"] == 3 and results["live_sweep_samples"] == 20
    for policy in POLICIES:
        assert 0.0 <= results[f"live_mean_acc_{policy}"] <= 1.0
        assert 0.0 <= results[f"live_max_violation_{policy}"] <= 1.0
    # Every sweep budget is at least the fastest configuration's latency: the lookup table
    # and the random feasible policy always find a configuration that fits.
    assert results["live_max_violation_lookup_table"] == 0.0
    assert results["live_max_violation_random_feasible"] == 0.0
    beats, loses = results["live_budgets_controller_B_beats_lookup"], results["live_budgets_controller_B_loses_to_lookup"]
    assert 0 <= beats + loses <= results["live_sweep_budgets"]
    # The family oracle serves each family's best feasible configuration: never worse than the table.
    assert results["oracle_gap_max"] >= results["oracle_gap_mean"] >= 0.0


def test_quality_shipped_controller(results):
    """What the real shipped artifacts must show (fails on untrained stand-ins)."""
    assert results["live_mean_acc_full_model"] >= 0.5  # the trained VLM answers
    # A trained controller does at least as well as picking a random configuration that fits.
    assert results["live_mean_acc_controller_mode_b"] >= results["live_mean_acc_random_feasible"] - 0.05
    # ... and stays close to the lookup table on average (within the smoke sweep's noise).
    assert results["live_mean_acc_controller_mode_b"] >= results["live_mean_acc_lookup_table"] - 0.15
    # It respects budgets: a violation costs more than any answer is worth.
    assert results["live_max_violation_controller_mode_b"] <= 0.3


def test_warm_start_clones_the_table(results):
    assert results["warm_start_steps"] == 5
    # Behaviour cloning lowers the negative log-likelihood of the teacher's configuration.
    assert results["warm_start_nll_last"] < results["warm_start_nll_first"]
    assert 0.0 <= results["warm_start_agree_with_teacher"] <= 1.0
    assert 0.0 <= results["warm_start_teacher_departs_from_table"] <= 1.0
    # Smoke mode clones for only a few steps, too few for the entropy bonus to separate the two.
    for key in ("warm_start_teacher_prob", "warm_start_teacher_prob_without_entropy"):
        assert 0.0 < results[key] <= 1.0
