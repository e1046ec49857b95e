"""The exercises' solutions (notebooks/solutions.ipynb), executed in smoke mode through papermill.

The same fixture as the numbered notebooks' tests; the checks are structural (the solutions
ran and recorded sane numbers), never about times.
"""

import pytest

from knoblib.data import FAMILIES

pytestmark = pytest.mark.notebook

NOTEBOOK = "solutions"


def test_runs_and_keeps_its_figures(outputs, figures):
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert figures >= 1


def test_solutions_record_sane_numbers(results):
    # 00: a higher price never picks a slower single configuration.
    assert results["ex00_1_best_at_0"].count("/") == 3
    assert set(results["ex00_2_drop_by_family"]) == set(FAMILIES)
    # 01: the per-family mix gets cheaper as the price rises; a depth-hungry family widens the ceiling.
    latency = results["ex01_1_mix_latency"]
    assert latency == sorted(latency, reverse=True)
    assert results["ex01_2_max_gap_depth-hungry"] >= results["ex01_2_max_gap_shipped"]
    # 02: with the guard no decision is over budget.
    assert results["ex02_1_over_guarded"] == 0 <= results["ex02_1_over_raw"]
    assert results["ex02_4_similarity_knoblib"] < results["ex02_4_similarity_original"]
    # 03: three runs of the ratios were recorded.
    assert len(results["ex03_1_ratios"]) == 3 and all(a > 0 and b > 0 for a, b in results["ex03_1_ratios"])
    # 04: a normalised group of five is bounded by (G - 1) / sqrt(G).
    assert 1.0 < results["ex04_1_group_advantage_max"] <= 4 / 5 ** 0.5 + 1e-3
    assert all(0.0 <= v <= 1.0 for v in results["ex04_4_clip_fraction"].values())
    assert results["ex04_4_clip_fraction"]["0.001/1e+06"] == 0.0  # no clipping with an infinite range
    # 05 and 06.
    assert results["ex05_1_seeds"] >= 1
    assert 0.0 <= results["ex05_3_agreement"] <= 1.0
    assert 0 <= results["ex06_1_one_right"] <= results["ex06_1_differ"]
