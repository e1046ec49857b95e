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


# --- the average-latency mode: a latency price instead of a budget ---------------------------
@pytest.fixture(scope="module")
def priced(explorer):
    """The explorer's pieces with an (untrained, seeded) Mode-B controller that reads a latency price."""
    from knoblib.controller import ControllerConfig, TwoStageController

    config = ControllerConfig.for_vlm(explorer.vlm, explorer.controllers["B"].config.budget_range, mode="B", seed=0,
                                      budget_guard=True, max_price=8.0)
    return BudgetExplorer(explorer.vlm, {"B": TwoStageController(config)}, explorer.table, explorer.config_accuracy,
                          explorer.samples[:6])


def test_serving_condition_maps_the_ui_choice_to_explain_arguments():
    from knoblib.widgets import SERVE_BY, serving_condition

    assert SERVE_BY == ("budget", "price")
    assert serving_condition("budget", 40.0, 2.0) == {"budget_ms": 40.0, "price": None}
    assert serving_condition("price", 40.0, 2.0) == {"budget_ms": None, "price": 2.0}
    with pytest.raises(ValueError, match="serve_by='mean'"):
        serving_condition("mean", 40.0, 2.0)


def test_explain_at_a_price_serves_without_a_budget(priced):
    result = priced.explain(0, None, "B", price=2.0)
    assert result.average_mode and result.price == 2.0 and math.isinf(result.budget_ms)
    assert not result.violated and result.latency_over_budget == 0.0
    assert result.latency_ms == priced.table.latency(result.knobs)
    # The static comparison at a price: the best accuracy minus the price's share of the latency.
    ref = priced.table.reference_ms
    best = max(priced.config_accuracy, key=lambda k: (priced.config_accuracy[k]["all"] - 2.0 * priced.table.latency(k) / ref,
                                                      -priced.table.latency(k)))
    assert result.table_knobs == best == priced.static_choice(2.0)
    text = priced.render(result)
    assert "latency price 2.00" in text and "static choice at this price: " in text
    assert parse_knobs(text) == result.knobs
    assert result.as_dict()["budget_ms"] is None and result.as_dict()["price"] == 2.0
    fig = priced.figure(result)
    assert "latency price 2.00" in fig.axes[0].get_title()


def test_a_higher_price_never_makes_the_static_choice_slower(priced):
    latencies = [priced.table.latency(priced.static_choice(p)) for p in (0.0, 0.5, 2.0, 8.0)]
    assert latencies == sorted(latencies, reverse=True)
    results = priced.price_response(1, [0.0, 8.0], "B")
    assert [r.price for r in results] == [0.0, 8.0]
    with pytest.raises(ValueError, match="prices is empty"):
        priced.price_response(1, [], "B")


@pytest.mark.parametrize("price", [float("nan"), float("inf"), -1.0, "2", True])
def test_bad_price_raises_value_error_naming_it(priced, price):
    with pytest.raises(ValueError, match="price="):
        priced.explain(0, None, "B", price=price)


def test_price_needs_a_controller_with_a_price_input(priced, explorer):
    with pytest.raises(ValueError, match="either budget_ms"):
        priced.explain(0, 40.0, "B", price=1.0)
    unpriced = [m for m in explorer.modes if explorer.max_price(m) == 0]
    for mode in unpriced:  # the shipped controllers, where they have no price input
        with pytest.raises(ValueError, match="no latency-price input"):
            explorer.explain(0, None, mode, price=1.0)


def test_price_for_target_meets_the_target_on_the_requests(priced):
    low = priced.mean_latency_at_price(priced.max_price("B"), "B")
    high = priced.mean_latency_at_price(0.0, "B")
    assert low <= high + 1e-9  # a dearer millisecond buys fewer of them
    target = (low + high) / 2
    price = priced.price_for_target(target, "B")
    assert 0.0 <= price <= priced.max_price("B")
    if low < target < high:
        assert priced.mean_latency_at_price(price, "B") <= target + 1e-6


def test_ui_switches_between_budget_and_price(priced):
    ui = build_explorer_ui(priced, sample=0, mode="B")
    serve_by, price, details, knobs = (find_widget(ui, CSS_CLASSES[k]) for k in ("serve_by", "price", "details", "knobs"))
    assert serve_by is not None and price is not None and not price.disabled
    assert (price.min, price.max) == (0.0, 8.0)
    assert "budget: " in details.value and "latency price" not in details.value
    price.value = 4.0
    serve_by.value = "price"
    assert "latency price 4.00" in details.value
    assert f"knobs: {knobs_text(priced.explain(0, None, 'B', price=4.0).knobs)}" in knobs.value
    serve_by.value = "budget"
    assert "latency price" not in details.value


def test_ui_reports_a_price_for_a_controller_without_one(explorer):
    unpriced = [m for m in explorer.modes if explorer.max_price(m) == 0]
    if not unpriced:
        pytest.skip("every shipped controller reads a price")
    ui = build_explorer_ui(explorer, sample=0, mode=unpriced[0])
    find_widget(ui, CSS_CLASSES["serve_by"]).value = "price"
    assert "no latency-price input" in find_widget(ui, CSS_CLASSES["details"]).value
    with pytest.raises(ValueError, match="no latency-price input"):
        build_explorer_ui(explorer, sample=0, mode=unpriced[0], serve_by="price", price=1.0)
