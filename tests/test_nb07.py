"""Notebook 07 (beyond Mode B) in smoke mode: it runs, keeps its figures, and records the comparison's numbers."""

import math

import nbformat
import pytest

pytestmark = pytest.mark.notebook

NAME = "07_beyond_mode_b"
KINDS = (
    "controller (Mode A)",
    "controller (Mode B)",
    "controller (Mode B + vision)",
    "controller (Mode B, distilled)",
    "controller (hybrid as A)",
    "controller (hybrid as B)",
)


@pytest.fixture(scope="module")
def run(notebook_results):
    return notebook_results(NAME)


def test_keeps_its_figures(run):
    _, _, executed = run
    nb = nbformat.read(str(executed), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Serving overhead, accuracy per budget, accuracy vs cost, the agreement of the choices.
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4


def test_the_notebook_follows_the_tutorial_layout():
    from knoblib.tutorial import NOTEBOOK_DIR

    nb = nbformat.read(str(NOTEBOOK_DIR / f"{NAME}.ipynb"), as_version=4)
    assert nb.cells[0].source.startswith("# 07 · ")
    assert any("You will learn" in c.source for c in nb.cells[:3])
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0].source.strip() == 'SMOKE = False\nRESULTS_DIR = "results"'
    assert "SMOKE" in nb.cells[nb.cells.index(parameters[0]) + 1].source
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    assert "## Summary" in headings and "## Exercises" in headings
    assert "save_results(results, \"07_beyond_mode_b\"" in nb.cells[-1].source


def test_structure_of_the_recorded_numbers(run):
    results, _, _ = run
    assert results["controllers"] == list(KINDS)
    assert results["n_recorded"] >= 100 and results["budgets_recorded"] >= 2
    for kind in KINDS:
        assert 0 <= results["mean_accuracy"][kind] <= 1
        assert 0 <= results["live_accuracy"][kind] <= 1
        assert 0 <= results["violation_rate"][kind] <= 1
        assert results["step_time_s"][kind] > 0
        assert results["step_time_over_mode_b"][kind] > 0
        assert math.isfinite(results["serving_overhead_ms"][kind])
        assert isinstance(results["reaches_mode_a_at_mode_b_cost"][kind], bool)
        assert results["accuracy_minus_mode_a"][kind] == pytest.approx(
            results["mean_accuracy"][kind] - results["mean_accuracy"]["controller (Mode A)"]
        )
    assert results["step_time_over_mode_b"]["controller (Mode B)"] == pytest.approx(1.0)
    # Both views of the hybrid were trained in one run: the same cost per step.
    assert results["step_time_s"]["controller (hybrid as A)"] == results["step_time_s"]["controller (hybrid as B)"]
    assert isinstance(results["any_variant_reaches_the_bar"], bool)
    assert 0 <= results["hybrid_heads_agreement"] <= 1
    assert results["n_live"] >= 10 and results["live_budgets"] >= 2
    assert results["live_serving_vision_reused_ms"] > 0 and results["live_serving_vision_computed_twice_ms"] > 0
    headroom = results["headroom"]
    # The oracle that reads the answers bounds the lookup table from above.
    assert headroom["per-request oracle"] >= headroom["lookup table"]
