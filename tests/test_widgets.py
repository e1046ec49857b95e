"""The budget explorer's callbacks on the shipped assets, bad inputs, and the ipywidgets UI."""

import base64
import math

import pytest
import torch

from knoblib.data import VQASample, generate_split
from knoblib.widgets import (
    CSS_CLASSES,
    BudgetExplorer,
    ExplorerResult,
    build_explorer_ui,
    find_widget,
    knobs_text,
    parse_knobs,
)

# Requests scanned for a budget-dependent choice (two batched runs per mode).
SCAN_SAMPLES = 16


@pytest.fixture(scope="module")
def explorer():
    """The shipped VLM, latency table, val accuracies and both controllers, over the first val requests."""
    return BudgetExplorer.from_shipped(num_samples=SCAN_SAMPLES)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_explain_is_consistent_with_the_table_and_the_lookup_policy(explorer, mode):
    low, high = explorer.budget_range
    budget = (low + high) / 2
    result = explorer.explain(0, budget, mode)
    assert isinstance(result, ExplorerResult)
    assert result.sample is explorer.samples[0] and result.mode == mode and result.budget_ms == budget
    explorer.vlm.knob_space.validate(result.knobs)
    assert result.latency_ms == explorer.table.latency(result.knobs)
    assert result.latency_over_budget == pytest.approx(result.latency_ms / budget)
    assert result.violated == (result.latency_ms > budget)
    assert result.correct == (result.answer == result.sample.answer)
    assert result.val_accuracy == explorer.config_accuracy[result.knobs]["all"]
    # The lookup table: the best-accuracy configuration that fits (one always fits mid-range).
    assert result.table_knobs == explorer.lookup.choose_one(budget)
    assert result.table_latency_ms <= budget and not result.table_violated
    assert result.table_correct == (result.table_answer == result.sample.answer)
    # Greedy and cached: the same call gives the same result.
    assert explorer.explain(0, budget, mode) == result


@pytest.mark.parametrize("mode", ["A", "B"])
def test_batched_calls_equal_single_calls(explorer, mode):
    low, high = explorer.budget_range
    many = explorer.explain_many([0, 1, 2], high, mode)
    explorer._cache.clear()  # recompute alone, not from the cache
    assert [explorer.explain(i, high, mode).knobs for i in range(3)] == [r.knobs for r in many]
    assert [explorer.explain(i, high, mode).answer for i in range(3)] == [r.answer for r in many]
    sweep = explorer.budget_response(1, None, mode)
    assert len(sweep) == 9
    assert [r.budget_ms for r in sweep] == pytest.approx(torch.linspace(low, high, 9, dtype=torch.float64).tolist())
    explorer._cache.clear()
    assert explorer.explain(1, sweep[-1].budget_ms, mode).knobs == sweep[-1].knobs


def test_lookup_choice_grows_with_the_budget_and_fits_when_it_can(explorer):
    low, high = explorer.budget_range
    sweep = explorer.budget_response(0, [low, explorer.table.min_ms, (low + high) / 2, explorer.table.max_ms, high])
    # Below the fastest configuration nothing fits: the lookup table falls back to the fastest.
    assert sweep[0].table_knobs == explorer.table.fastest() and sweep[0].table_violated
    for r in sweep[1:]:
        assert r.table_latency_ms <= r.budget_ms
    accuracies = [r.table_val_accuracy for r in sweep[1:]]
    assert accuracies == sorted(accuracies)  # more budget never buys a worse configuration


@pytest.mark.parametrize("mode", ["A", "B"])
def test_moving_the_budget_from_lowest_to_highest_changes_the_knobs_for_some_request(explorer, mode):
    """A trained controller must react to the budget. (An untrained one may not: then this fails.)"""
    low, high = explorer.budget_range
    indices = list(range(SCAN_SAMPLES))
    at_low = explorer.explain_many(indices, low, mode)
    at_high = explorer.explain_many(indices, high, mode)
    changed = [i for i, a, b in zip(indices, at_low, at_high) if a.knobs != b.knobs]
    assert changed, f"Mode {mode}: the same knobs at {low:.1f} ms and {high:.1f} ms for all {len(indices)} requests"
    assert explorer.knobs_change(changed[0], mode)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -float("inf"), 0.0, -5.0, "50", None, True])
def test_bad_budget_raises_value_error_naming_it(explorer, budget):
    with pytest.raises(ValueError, match="budget_ms=") as err:
        explorer.explain(0, budget)
    assert repr(budget) in str(err.value)


def test_bad_sample_and_mode_raise(explorer):
    with pytest.raises(ValueError, match=r"sample=999 is out of range: allowed 0\.\."):
        explorer.explain(999, 50.0)
    with pytest.raises(ValueError, match="sample=-1 is out of range"):
        explorer.explain(-1, 50.0)
    with pytest.raises(TypeError, match="index or a VQASample"):
        explorer.explain("0", 50.0)
    with pytest.raises(ValueError, match=r"mode='C' is invalid: allowed \['A', 'B'\]"):
        explorer.explain(0, 50.0, "C")
    with pytest.raises(ValueError, match="which is empty"):
        explorer.explain_many([], 50.0)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed="):
            explorer.new_sample(seed)


def test_constructor_rejects_inconsistent_pieces(explorer):
    ex = explorer
    with pytest.raises(ValueError, match="controllers is empty"):
        BudgetExplorer(ex.vlm, {}, ex.table, ex.config_accuracy, ex.samples)
    with pytest.raises(ValueError, match="controllers has key 'C'"):
        BudgetExplorer(ex.vlm, {"C": ex.controllers["B"]}, ex.table, ex.config_accuracy, ex.samples)
    with pytest.raises(ValueError, match=r"controllers\['A'\] is a Mode-B controller"):
        BudgetExplorer(ex.vlm, {"A": ex.controllers["B"]}, ex.table, ex.config_accuracy, ex.samples)
    with pytest.raises(ValueError, match="samples is empty"):
        BudgetExplorer(ex.vlm, ex.controllers, ex.table, ex.config_accuracy, [])
    with pytest.raises(ValueError, match="config_accuracy is empty"):
        BudgetExplorer(ex.vlm, ex.controllers, ex.table, {}, ex.samples)
    only_b = BudgetExplorer(ex.vlm, {"B": ex.controllers["B"]}, ex.table, ex.config_accuracy, ex.samples[:1])
    assert only_b.modes == ("B",)
    with pytest.raises(ValueError, match=r"mode='A' is invalid: allowed \['B'\]"):
        only_b.explain(0, 50.0, "A")


def test_new_sample_draws_a_fresh_reproducible_request(explorer):
    before = len(explorer.samples)
    sample = explorer.new_sample(4242)
    assert sample == generate_split(1, 4242)[0]
    assert explorer.samples[-1] is sample and len(explorer.samples) == before + 1
    result = explorer.explain(before, 60.0)
    assert result.sample is sample
    # A request given directly works as well and is not added.
    other = generate_split(1, 7)[0]
    assert explorer.explain(other, 60.0).sample is other
    assert len(explorer.samples) == before + 1
    explorer.samples.pop()


def test_render_has_parseable_lines(explorer):
    result = explorer.explain(2, 40.0, "B")
    text = explorer.render(result)
    lines = text.splitlines()
    assert f"knobs: {knobs_text(result.knobs)}" in lines
    assert parse_knobs(text) == result.knobs
    answer_line = next(line for line in lines if line.startswith("answer: "))
    verdict = "(correct)" if result.correct else f"(wrong, expected {result.sample.answer})"
    assert answer_line == f"answer: {result.answer or '<empty>'} {verdict}"
    assert "budget: 40.0 ms (mode B)" in lines
    assert any(line.startswith("latency: ") and ("VIOLATED" in line) == result.violated for line in lines)
    assert any(line.startswith("lookup table: " + knobs_text(result.table_knobs)) for line in lines)
    with pytest.raises(ValueError, match="no 'knobs:"):
        parse_knobs("answer: red")
    # as_dict is flat and JSON-able.
    flat = result.as_dict()
    assert all(isinstance(v, (str, int, float, bool)) or v is None for v in flat.values())
    assert flat["knobs"] == result.knobs.short() and flat["violated"] == result.violated


def test_figure_shows_image_pareto_and_budget(explorer, tmp_path):
    import matplotlib.pyplot as plt

    result = explorer.explain(0, 30.0, "B")
    fig = explorer.figure(result)
    assert len(fig.axes) == 2
    pareto, image = fig.axes
    assert image.images, "the request's image is drawn"
    budget_lines = [line for line in pareto.get_lines() if list(line.get_xdata()) == [30.0, 30.0]]
    assert budget_lines, "the budget is a vertical line"
    assert any("budget 30.0 ms" in t.get_text() for t in pareto.get_legend().get_texts())
    assert fig.number not in plt.get_fignums(), "the figure is closed (not shown twice in a notebook)"
    fig.savefig(tmp_path / "explorer.png")
    assert (tmp_path / "explorer.png").stat().st_size > 1000


def _png(figure_output) -> bytes:
    (out,) = figure_output.outputs
    return base64.b64decode(out["data"]["image/png"])


def test_ui_builds_and_follows_the_slider_mode_and_sample(explorer):
    ui = build_explorer_ui(explorer, sample=0, mode="B")
    parts = {role: find_widget(ui, css) for role, css in CSS_CLASSES.items()}
    assert all(w is not None for w in parts.values()), parts
    slider, knobs, answer, details, figure = (parts[k] for k in ("budget", "knobs", "answer", "details", "figure"))
    low, high = explorer.budget_range
    assert (slider.min, slider.max) == pytest.approx((low, high))
    assert "knobs: " in knobs.value and "answer: " in answer.value
    first_png, first_details = _png(figure), details.value
    assert first_png.startswith(b"\x89PNG")

    slider.value = slider.min  # what a user's drag (or the Home key) does
    expected = explorer.explain(0, slider.value, "B")
    assert f"knobs: {knobs_text(expected.knobs)}" in knobs.value
    assert f"budget: {slider.value:.1f} ms" in details.value and details.value != first_details
    assert _png(figure) != first_png, "the figure follows the budget line"
    slider.value = slider.max
    assert f"knobs: {knobs_text(explorer.explain(0, slider.value, 'B').knobs)}" in knobs.value

    parts["mode"].value = "A"
    assert "(mode A)" in details.value
    assert f"knobs: {knobs_text(explorer.explain(0, slider.value, 'A').knobs)}" in knobs.value

    before = len(explorer.samples)
    parts["new_sample"].click()
    assert len(explorer.samples) == before + 1 and parts["sample"].value == before
    assert explorer.samples[-1].question in details.value
    explorer.samples.pop()


def test_ui_shows_callback_errors_instead_of_swallowing_them(explorer, monkeypatch):
    lo, hi = explorer.budget_range
    ui = build_explorer_ui(explorer, sample=1, budget_ms=lo + 0.3 * (hi - lo))
    details = find_widget(ui, CSS_CLASSES["details"])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(explorer, "explain", broken)
    # A value inside the slider's range, so the change really fires the callback.
    find_widget(ui, CSS_CLASSES["budget"]).value = lo + 0.7 * (hi - lo)
    assert "error: RuntimeError: boom" in details.value
    assert "(error)" in find_widget(ui, CSS_CLASSES["knobs"]).value


def test_ui_rejects_bad_initial_values(explorer):
    with pytest.raises(ValueError, match="sample=99"):
        build_explorer_ui(explorer, sample=99)
    with pytest.raises(ValueError, match="budget_ms=nan"):
        build_explorer_ui(explorer, budget_ms=math.nan)
    with pytest.raises(ValueError, match="mode='X'"):
        build_explorer_ui(explorer, mode="X")


def test_a_vqa_sample_is_accepted_wherever_an_index_is(explorer):
    sample = explorer.samples[3]
    assert isinstance(sample, VQASample)
    assert explorer.explain(sample, 70.0) == explorer.explain(3, 70.0)
