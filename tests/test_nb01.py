"""Notebook 01 in smoke mode: latency on this machine, budgets, the Pareto front.

Structural checks hold for any artifacts; the ``test_quality_*`` checks are what the
shipped latency table, accuracies and block ranking must show.
"""

import json

import pytest

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def run(notebook_results):
    return notebook_results("01_latency_and_budgets")


@pytest.fixture(scope="module")
def results(run):
    return run[0]


def test_runs_in_time_and_keeps_figures(run):
    _, seconds, executed = run
    assert seconds < 90
    cells = json.loads(executed.read_text())["cells"]
    assert sum("image/png" in out.get("data", {}) for cell in cells for out in cell.get("outputs", [])) >= 4


def test_latency_table_numbers(results):
    assert results["num_configs"] > 1
    assert 0 < results["min_latency_ms"] <= results["max_latency_ms"]
    assert results["cheapest_over_full_latency"] > 0
    assert results["budget_low_ms"] < results["min_latency_ms"] <= results["max_latency_ms"] < results["budget_high_ms"]


def test_live_profile_numbers(results):
    assert results["live_vs_shipped_median_ratio"] > 0
    assert 0.0 <= results["live_pair_order_agreement"] <= 1.0


def test_pareto_and_lookup(results):
    assert 1 <= results["num_pareto_optimal"] <= results["num_configs"]
    picks = [results[f"lookup_pick_{i}"] for i in range(8)]
    assert all(isinstance(p, str) and p.count("/") == 3 for p in picks)
    assert results["lookup_distinct_picks"] == len(set(picks)) <= results["num_pareto_optimal"]
    # A larger budget only adds feasible configurations: the pick's accuracy never falls.
    accuracy = [results[f"lookup_pick_{i}_val_accuracy"] for i in range(8)]
    assert accuracy == sorted(accuracy)


def test_live_importance(results):
    assert 0.0 <= results["live_importance_full_accuracy"] <= 1.0
    assert "live_importance_block0" in results
    assert results["shipped_importance_present"] in (0, 1)


def test_quality_knobs_buy_latency(results):
    assert results["cheapest_over_full_latency"] < 0.8
    assert results["latency_ratio_tier_min"] < 1.0
    assert results["latency_ratio_blocks_min"] < 1.0
    assert results["latency_ratio_top_k_min"] <= 1.05


def test_quality_table_matches_this_machine(results):
    # Timings: only a coarse agreement is asserted (the pair order of near-equal
    # configurations flips with timing noise; it is reported, not tested).
    assert 1 / 3 <= results["live_vs_shipped_median_ratio"] <= 3


def test_quality_real_trade_off(results):
    assert results["num_pareto_optimal"] >= 3
    assert results["lookup_distinct_picks"] >= 2


def test_quality_block_ranking_shipped(results):
    assert results["shipped_importance_present"] == 1
    assert results["shipped_importance_block0"] >= 0.2
