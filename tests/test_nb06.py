"""Notebook 06 (budget explorer) in smoke mode: it runs, keeps its figures, and records sane numbers."""

import pytest

from knoblib.data import data_path
from knoblib.knobs import KnobConfig
from knoblib.latency import LatencyTable

pytestmark = pytest.mark.notebook

NOTEBOOK = "06_budget_explorer"


def _knobs(short: str) -> KnobConfig:
    tier, p, k, b = short.split("/")
    return KnobConfig(tier, int(p[1:]), int(k[1:]), int(b[1:]))


def test_keeps_figures(outputs, figures):
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert figures >= 3  # the pipeline, the featured request, its budget response
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)  # the UI


def test_structure_of_the_recorded_numbers(results):
    table = LatencyTable.load(data_path("latency_table.json"))
    assert results["num_requests"] >= 8
    assert results["budget_low_ms"] < table.min_ms <= table.max_ms <= results["budget_high_ms"] * 1.2
    # Below the fastest configuration nothing fits: the lookup table falls back to the fastest.
    assert _knobs(results["lookup_knobs_low"]) == table.fastest()
    assert results["request_violated_low"] == 1 and results["request_table_violated_low"] == 1
    assert results["request_latency_low_B_ms"] == pytest.approx(table.latency(_knobs(results["request_knobs_low_B"])))
    assert results["request_latency_high_B_ms"] == pytest.approx(table.latency(_knobs(results["request_knobs_high_B"])))
    assert results["bad_inputs_refused"] == 6
    for mode, s in results["scan"].items():
        assert mode in ("A", "B")
        assert 0 <= s["changed"] <= results["num_requests"]
        assert s["distinct_low"] == 1  # below the fastest configuration only it is open
        assert 1 <= s["distinct_high"] <= results["num_requests"]
        assert 0 <= s["accuracy_high"] <= 1


def test_the_featured_request_differs_from_the_table_when_any_does(results):
    assert 0 <= results["featured_request"] < results["num_requests"]
    assert 0 <= results["differing_pairs"] <= results["scanned_pairs"]
    if results["differing_pairs"]:
        assert results["featured_knobs"] != results["featured_table_knobs"]
    assert results["featured_budget_ms"] > 0
    for key in ("featured_knobs", "featured_table_knobs"):
        assert _knobs(results[key]) in LatencyTable.load(data_path("latency_table.json"))


def test_average_mode_when_a_controller_reads_a_price(results):
    if "price_for_target" not in results:
        pytest.skip("no shipped controller reads a latency price")
    assert results["mean_latency_price_top_ms"] <= results["mean_latency_price0_ms"] + 1e-6
    assert 0 <= results["price_for_target"]


def test_quality_of_the_trained_controllers(results):
    """What the REAL trained controllers must show (untrained stand-ins fail this)."""
    assert results["differing_pairs"] >= 1  # somewhere the controller reads the question
    for mode, s in results["scan"].items():
        # The budget matters: some request gets other knobs at the highest budget than at the lowest ...
        assert s["changed"] >= 1, mode
        # ... and on average the controller spends more when it may.
        assert s["latency_high"] > s["latency_low"], mode
        # With every configuration allowed, it answers clearly better than chance (~1/5).
        assert s["accuracy_high"] >= 0.4, mode
