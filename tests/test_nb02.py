"""Notebook 02 in smoke mode: language and budget features, Stage 1, and the budget guard.

Structural checks hold for any controller; the ``test_quality_*`` checks are what the
shipped, trained Mode-B controller must show.
"""

import math

import pytest

from knoblib.data import FAMILIES

pytestmark = pytest.mark.notebook

NOTEBOOK = "02_stage1_sampling"


def test_keeps_figures(figures):
    assert figures >= 5  # pipeline, similarity, encodings, raw vs guarded, per family


def test_features(results):
    assert results["family_from_lang_feat_accuracy"] >= 0.6
    assert results["encoding_original_low_high_similarity"] > 0.9
    assert results["encoding_knoblib_low_high_similarity"] < results["encoding_original_low_high_similarity"] - 0.2


def test_group_and_entropies(results):
    assert len(results["group"]) == 5 and all(k.count("/") == 3 for k in results["group"])
    assert all(results["group_fits"])  # sampled under the guard's mask
    for name in ("tier", "insertion_position"):
        assert 0.0 <= results[f"entropy_{name}"] <= results[f"entropy_{name}_uniform"] + 1e-6
    assert results["entropy_tier_uniform"] == pytest.approx(math.log(3))


def test_the_guard_keeps_every_greedy_decision_feasible(results):
    assert len(results["greedy_raw"]) == len(results["greedy_guarded"]) == 8
    assert results["greedy_over_guarded"] == 0
    assert 0 <= results["greedy_over_raw"] <= 8
    # At the lowest budget only the cheapest tier fits.
    assert results["p_high_tier_guarded_min_budget"] == pytest.approx(0.0, abs=1e-6)
    for family in FAMILIES:
        assert 0.0 <= results[f"p_high_tier_guarded_max_budget_{family}"] <= 1.0


def test_quality_trained_stage1_wants_the_high_tier_and_leaves_feasibility_to_the_guard(results):
    # The shipped controller was trained with the guard: its raw distribution prefers the
    # high tier at every budget; the guarded one takes it only where it fits.
    assert results["p_high_tier_raw_max_budget"] >= 0.5
    assert results["p_high_tier_guarded_max_budget"] >= 0.5
    assert results["greedy_over_raw"] >= 1


def test_quality_tier_depends_on_the_family(results):
    assert results["p_high_tier_guarded_max_budget_mark"] >= results["p_high_tier_guarded_max_budget_color"]


def test_quality_trained_policy_is_not_uniform(results):
    assert results["entropy_tier"] < results["entropy_tier_uniform"] - 0.05
