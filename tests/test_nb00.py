"""Notebook 00 in smoke mode: the data, the tiny MoE VLM and its four knobs.

Structural checks hold for any model; the ``test_quality_*`` checks are what the shipped,
trained model must show (they fail on untrained stand-in artifacts).
"""

import pytest

from knoblib.data import FAMILIES
from knoblib.knobs import TIERS, KnobSpace

pytestmark = pytest.mark.notebook

NOTEBOOK = "00_data_and_model"


def test_keeps_figures(figures):
    assert figures >= 5  # pipeline, samples, tiers, knob table, expert ablation


def test_knob_space_numbers(results):
    space = KnobSpace.for_model(results["num_blocks"], results["default_top_k"])
    assert results["num_configs"] == len(space)
    assert results["num_experts"] >= results["default_top_k"] >= 1
    assert results["num_parameters"] > 0
    assert set(results["test_questions_per_family"]) == set(FAMILIES)
    assert all(n > 0 for n in results["test_questions_per_family"].values())


def test_tiers_change_the_work(results):
    assert results["glyphs_identical_low"] == 1 and results["glyphs_identical_high"] == 0
    assert [results[f"num_crops_{t}"] for t in TIERS] == [1, 5, 10]
    lengths = [results[f"sequence_length_{t}"] for t in TIERS]
    assert lengths == sorted(lengths) and len(set(lengths)) == 3


def test_top_k_and_blocks_are_applied(results):
    probe = results["top_k_probe"]
    tier, p, k, b = probe["knobs"].split("/")
    p, k = int(p[1:]), int(k[1:])
    experts = {int(block): n for block, n in probe["experts_per_block"].items()}
    assert sorted(experts) == list(range(results["num_blocks"]))
    # Blocks before p ran before Stage 2 decided: the default top-k; from p on, the chosen one.
    assert all(n == (results["default_top_k"] if block < p else k) for block, n in experts.items())
    blocks = results["blocks_probe"]
    assert 0 in blocks["ran"] and 0 not in blocks["skipped"]
    assert sorted(blocks["ran"] + blocks["skipped"]) == list(range(results["num_blocks"]))
    assert len(blocks["ran"]) == int(blocks["knobs"].split("/")[3][1:])


def test_accuracies_are_recorded(results):
    assert results["n_eval"] == 100
    for name in ("full", "cheapest"):
        assert 0.0 <= results[f"{name}_accuracy"] <= 1.0
        for family in FAMILIES:
            assert 0.0 <= results[f"{name}_accuracy_{family}"] <= 1.0


def test_live_accuracy_matches_the_knob_table(results):
    # The shipped knob table belongs to the shipped model: the live accuracies (first 100 test
    # questions) agree with it within four binomial standard errors.
    tolerance = 4 * (0.25 / results["n_eval"]) ** 0.5
    for name in ("full", "cheapest"):
        assert abs(results[f"{name}_accuracy"] - results["knob_table"][name]["all"]) <= tolerance, name


def test_knob_table_numbers(results):
    table = results["knob_table"]
    for row in ("full", "tier=low", "tier=medium", "cheapest"):
        for metric in ("all", *FAMILIES):
            assert 0.0 <= table[row][metric] <= 1.0
    assert table["full"]["latency_vs_full"] == pytest.approx(1.0)
    assert any(name.startswith("blocks=") for name in table)
    assert any(name.startswith("top_k=") for name in table)


def test_quality_full_model_answers(results):
    assert results["full_accuracy"] >= 0.6
    assert results["full_accuracy"] - results["cheapest_accuracy"] >= 0.05


def test_quality_mark_needs_the_tier(results):
    table = results["knob_table"]
    assert table["tier=low"]["mark"] <= 0.5
    assert table["full"]["mark"] - table["tier=low"]["mark"] >= 0.2


def test_quality_color_is_easy(results):
    table = results["knob_table"]
    assert table["full"]["color"] >= 0.9
    assert table["cheapest"]["color"] >= 0.7


def test_quality_knobs_hurt_families_differently(results):
    # The low tier costs mark far more than color: the premise of a content-aware controller.
    table = results["knob_table"]
    mark_drop = table["full"]["mark"] - table["tier=low"]["mark"]
    color_drop = table["full"]["color"] - table["tier=low"]["color"]
    assert mark_drop - color_drop >= 0.2


def test_quality_cheapest_is_cheaper(results):
    assert results["knob_table"]["cheapest"]["latency_vs_full"] < 0.8


def test_expert_ablation_recorded(results):
    kept = {int(k): v for k, v in results["router_mass_kept"].items()}
    assert sorted(kept) == list(range(1, results["num_experts"] + 1))
    assert all(kept[k] < kept[k + 1] for k in range(1, len(kept)))
    assert kept[len(kept)] == pytest.approx(1.0, abs=1e-4)
    experts = results["expert_ablation_experts"]
    assert list(experts.values())[-3:] == [1, results["default_top_k"] - 1, 0]
    for acc in results["expert_ablation"].values():
        assert set(acc) == {"all", *FAMILIES}


def test_quality_experts_matter_and_the_first_choice_carries_them(results):
    # The MoE blocks do work (no experts costs points) and the router's first choice does
    # most of it (the experts without it lose more than top-1 does): why top_k is cheap here.
    acc = {name: a["all"] for name, a in results["expert_ablation"].items()}
    default = next(a for name, a in acc.items() if name.endswith("(default)"))
    none = acc["no experts in blocks >= 1"]
    top1 = acc["top_k=1 (outside the knob space)"]
    without_first = next(a for name, a in acc.items() if "without the strongest" in name)
    assert default - none >= 0.05
    assert top1 - without_first >= 0.03
