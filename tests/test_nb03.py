"""Notebook 03 in smoke mode: Stage 2, Mode A (latency token) vs Mode B (language + budget).

Structural checks hold on any machine and artifacts. Times are recorded, never judged:
they belong to the machine that ran the notebook.
"""

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "03_stage2_mode_a_vs_mode_b"


def test_keeps_figures(figures):
    assert figures >= 4  # pipeline, forward counts, partial forward, group batching


def test_forward_counts(results):
    assert results["forwards_per_request_A-naive"] == 10
    assert (results["partial_per_request_A-naive"], results["full_per_request_A-naive"]) == (5, 5)
    for mode in ("A-resumable", "B"):
        assert results[f"forwards_per_request_{mode}"] == 5
        assert (results[f"partial_per_request_{mode}"], results[f"full_per_request_{mode}"]) == (0, 5)


def test_probe_and_latency_token(results):
    assert results["probe_changes_answers"] == 0
    assert results["partial_equals_paused"] == 1
    assert results["twin_lang_feat_equal"] == 1
    assert results["twin_latency_token_similarity"] < 1.0


def test_batched_group_answers_like_sequential_calls(results):
    assert results["batched_equals_sequential"] == 1


def test_timings_are_recorded(results):
    for mode in ("A-naive", "A-resumable", "B"):
        assert results[f"step_time_s_{mode}"] > 0
        assert 0 < results[f"rollout_time_s_{mode}"] <= results[f"step_time_s_{mode}"]
    for mode in ("A-naive", "A-resumable"):
        assert results[f"step_time_ratio_{mode}_over_B"] == pytest.approx(
            results[f"step_time_s_{mode}"] / results["step_time_s_B"])
    assert results["full_rollout_ms"] > 0 and results["prefill_ms"] > 0
    shares = [k for k in results if k.startswith("partial_share_p")]
    assert shares and results["partial_share_max"] == max(results[k] for k in shares)
    assert results["group_sequential_ms"] > 0 and results["group_batched_ms"] > 0
    assert results["sequential_over_batched"] == pytest.approx(results["group_sequential_ms"] / results["group_batched_ms"])
