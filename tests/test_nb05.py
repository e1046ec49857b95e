"""Notebook 05 (training, and the shipped controllers on the plane), executed in smoke mode through papermill.

Structural checks hold for any artifacts; the ``test_quality_*`` checks are what the shipped
controllers and their evaluation must show (three seeds per controller, intervals).
"""

import pytest

from knoblib.data import FAMILIES

pytestmark = pytest.mark.notebook

NOTEBOOK = "05_gpu_training"


def test_keeps_figures(figures):
    assert figures >= 8  # pipeline, live curves x2, forwards, shipped curves, plane, vs baseline, families


def test_device_and_resume(results):
    assert results["device_requested"] == "auto"
    assert results["device_used"] in ("cpu", "cuda", "cuda:0")
    assert results["resume_identical"] == 1


def test_modes_count_forwards(results):
    assert results["forwards_per_request_B"] == 5  # G full forwards
    assert results["forwards_per_request_A-resumable"] == 5  # G forwards that pause at p
    assert results["forwards_per_request_A-naive"] == 10  # G partial + G full
    for mode in ("B", "A-resumable", "A-naive"):
        assert -10 < results[f"final_reward_{mode}"] < 10


def test_warm_start_is_recorded(results):
    assert results["warm_start_steps"] == 5
    for key in ("warm_start_reward_first", "warm_start_reward_last"):
        assert -3 < results[key] < 2


def test_plane_comparisons_carry_intervals(results):
    rows = results["versus_baseline"]
    assert rows
    for r in rows:
        mean, low, high = r["accuracy_vs_baseline"]
        assert low <= mean + 1e-9 and mean <= high + 1e-9
        assert r["accuracy_verdict"] in ("better", "worse", "tie")
        if r["kind"] == "budget":
            assert r["latency_verdict"] in ("better", "worse", "tie")
    for name, tally in results["verdict_tally"].items():
        assert sum(tally["accuracy"].values()) == sum(1 for r in rows if r["policy"] == name)


def test_family_choices_and_ceiling(results):
    assert set(results["family_choices"]) == set(FAMILIES)
    for per_budget in results["family_choices"].values():
        assert all(k is None or k.count("/") == 3 for k in per_budget.values())
    assert all(v is None or v > -5 for v in results["ceiling_captured"].values())


def test_measured_rows_are_structured(results):
    rows = results["measured"]
    assert rows
    for r in rows:
        assert r["n"] >= 1 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["violation_rate"] <= 1.0
        assert r["mean_latency_ms"] > 0 and r["table_mean_latency_ms"] > 0
        # Read at the guard's p99, the table never breaks a budget the fastest configuration meets
        # (the full model, which ignores the budget, is there to show what breaking looks like).
        if r["policy"] != "full model":
            assert r["table_violation_rate"] == 0.0


def test_quality_three_seeds_of_each_controller(results):
    """The shipped controllers: Mode A, Mode B and budget-only Mode B, three training seeds each."""
    seeds = results["plane_controllers"]
    assert len(seeds) >= 3, seeds
    assert all(n >= 3 for n in seeds.values()), seeds
    assert any("budget-only" in name for name in seeds)
    assert all(r["seeds"] >= 3 for r in results["versus_baseline"])


def test_quality_controllers_never_lose_clearly_to_the_table_on_accuracy(results):
    for r in results["versus_baseline"]:
        if r["kind"] == "budget" and "budget-only" not in r["policy"]:
            assert r["accuracy_vs_baseline"][2] > -0.05, r  # the interval's top: not clearly 5 points worse
