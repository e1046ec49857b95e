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
    assert figures >= 2  # the explorer figure and the sweep
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)  # the UI


def test_structure_of_the_recorded_numbers(results):
    table = LatencyTable.load(data_path("latency_table.json"))
    assert results["num_requests"] >= 8
    assert results["budget_low_ms"] < table.min_ms <= table.max_ms < results["budget_high_ms"]
    # Below the fastest configuration nothing fits: the lookup table falls back to the fastest.
    assert _knobs(results["lookup_knobs_low"]) == table.fastest()
    assert results["request_latency_low_B_ms"] > results["budget_low_ms"]
    assert results["request_latency_low_B_ms"] == pytest.approx(table.latency(_knobs(results["request_knobs_low_B"])))
    assert results["request_latency_high_B_ms"] == pytest.approx(table.latency(_knobs(results["request_knobs_high_B"])))
    assert 0 <= results["featured_request"] < results["num_requests"]
    for mode in ("A", "B"):
        assert 0 <= results[f"requests_changed_{mode}"] <= results["num_requests"]
        assert 1 <= results[f"distinct_knobs_high_{mode}"] <= results["num_requests"]
        assert results[f"violation_rate_high_{mode}"] == 0  # above the slowest configuration everything fits
        assert 0 <= results[f"accuracy_high_{mode}"] <= 1
        for end in ("low", "high"):
            assert _knobs(results[f"featured_knobs_{end}_{mode}"]) in table
    # The widget starts on a request whose knobs move with the budget, when one exists.
    mode = results["featured_mode"]
    assert mode in ("A", "B")
    if results[f"requests_changed_{mode}"]:
        assert results[f"featured_knobs_low_{mode}"] != results[f"featured_knobs_high_{mode}"]


def test_quality_of_the_trained_controllers(results):
    """What the REAL trained controllers must show (the untrained stand-ins fail this)."""
    for mode in ("A", "B"):
        # The budget matters: some request gets other knobs at the highest budget than at the lowest ...
        assert results[f"requests_changed_{mode}"] >= 1, mode
        # ... and on average the controller spends more when it may.
        assert results[f"mean_latency_high_{mode}_ms"] > results[f"mean_latency_low_{mode}_ms"], mode
        # With every configuration allowed, it answers clearly better than chance (~1/5).
        assert results[f"accuracy_high_{mode}"] >= 0.4, mode
