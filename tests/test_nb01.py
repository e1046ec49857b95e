"""Notebook 01 in smoke mode: latency on this machine, budgets, the Pareto front.

Structural checks hold for any artifacts; the ``test_quality_*`` checks are what the
shipped latency table, accuracies and block ranking must show.
"""

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "01_latency_and_budgets"


def test_keeps_figures(figures):
    assert figures >= 4


def test_latency_table_numbers(results):
    assert results["num_configs"] > 1
    assert 0 < results["min_latency_ms"] <= results["max_latency_ms"]
    assert results["cheapest_over_full_latency"] > 0
    assert results["budget_low_ms"] < results["min_latency_ms"] <= results["max_latency_ms"] < results["budget_high_ms"]


def test_spot_check_numbers(results):
    # Recorded, not judged: timings belong to the machine (benchmarks compare them, tests do not).
    assert results["spot_check_ratio"] > 0
    assert 0.0 <= results["spot_check_pair_order_agreement"] <= 1.0
    assert results["local_table_is_shipped"] in (0, 1)


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


def test_quality_real_trade_off(results):
    assert results["num_pareto_optimal"] >= 3
    assert results["lookup_distinct_picks"] >= 2


def test_quality_block_ranking_shipped(results):
    assert results["shipped_importance_present"] == 1
    assert results["shipped_importance_block0"] >= 0.2
