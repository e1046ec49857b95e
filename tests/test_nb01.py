"""Notebook 01 in smoke mode: latency on this machine, budgets, the lookup table and the ceiling.

Structural checks hold for any artifacts; the ``test_quality_*`` checks are what the
shipped latency table, accuracies, correctness tables and block ranking must show.
"""

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "01_latency_and_budgets"


def test_keeps_figures(figures):
    assert figures >= 7  # pipeline, breakdown, budgets, front, picks, ceiling, importance (x2)


def test_latency_table_numbers(results):
    assert results["num_configs"] > 1
    assert 0 < results["min_latency_ms"] <= results["max_latency_ms"]
    assert 0 < results["cheapest_over_full_latency"] < 1
    assert results["budget_low_ms"] < results["min_latency_ms"] <= results["max_latency_ms"] < results["budget_high_ms"]
    budgets = results["eval_budgets_ms"]
    assert budgets == sorted(budgets) and budgets[0] >= results["min_latency_ms"]


def test_spot_check_numbers(results):
    # Recorded, not judged: timings belong to the machine (benchmarks compare them, tests do not).
    assert results["spot_check_ratio"] > 0
    assert results["local_table_is_shipped"] == 1  # the test suite pins the shipped table


def test_front_and_lookup(results):
    assert 1 <= results["num_pareto_optimal"] <= results["num_configs"]
    picks = results["lookup_picks"]
    assert all(isinstance(p, str) and p.count("/") == 3 for p in picks)
    assert results["lookup_picks_on_front"] == 1
    # A larger budget only adds feasible configurations: the pick's accuracy never falls.
    accuracy = results["lookup_pick_val_accuracy"]
    assert accuracy == sorted(accuracy)


def test_ceiling_is_above_the_baselines(results):
    points = results["ceiling_points"]
    by = {(p["policy"], p["kind"], p["x"]): p for p in points}
    budgets = sorted({p["x"] for p in points if p["kind"] == "budget"})
    targets = sorted({p["x"] for p in points if p["kind"] == "target"})
    assert len(budgets) == len(targets) == 4
    for b in budgets:
        table, family, oracle = (by[name, "budget", b] for name in ("lookup table", "per-family oracle", "per-request oracle"))
        # The per-request oracle reads the answers: nothing that fits is more accurate.
        assert oracle["accuracy"] >= max(table["accuracy"], family["accuracy"]) - 1e-6
        assert table["violation_rate"] == 0.0 and family["violation_rate"] == 0.0
    for t in targets:
        hull, single = by["static hull (random mix)", "target", t], by["best single configuration", "target", t]
        assert by["per-request oracle", "target", t]["accuracy"] >= hull["accuracy"] - 1e-6
        assert hull["mean_latency_ms"] <= t + 1.0 and single["mean_latency_ms"] <= t + 1e-6
    assert results["ceiling_request_oracle_accuracy_max"] <= 1.0


def test_live_importance(results):
    assert 0.0 <= results["live_importance_full_accuracy"] <= 1.0
    assert set(results["live_importance"]) == {"0", str(len(results["shipped_importance"]) - 1)}


def test_quality_real_trade_off(results):
    assert results["num_pareto_optimal"] >= 3
    assert len(set(results["lookup_picks"])) >= 2


def test_quality_the_ceiling_shows_what_the_question_buys(results):
    # Knowing the family saves latency under caps and gains accuracy under a mean-latency target.
    assert results["ceiling_family_saving_max"] > 0.05
    assert results["ceiling_family_gain_max"] > 0.0
    assert results["ceiling_family_accuracy_gap_max"] >= 0.0


def test_quality_block_ranking_shipped(results):
    assert results["shipped_importance"][0] >= 0.2
    assert results["shipped_drop_order"][0] != 0
    assert results["live_importance"]["0"] >= 0.2
