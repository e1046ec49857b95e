"""Notebook 03 in smoke mode: Stage 2, Mode A (latency token) vs Mode B (language + budget).

Structural checks hold on any machine and artifacts; the ``test_quality_*`` checks are
what this machine's measurements and the shipped evaluation must show.
"""

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOK = "03_stage2_mode_a_vs_mode_b"


def test_keeps_figures(figures):
    assert figures >= 3


def test_forward_counts(results):
    assert results["forwards_per_request_A-naive"] == 10
    assert results["forwards_per_request_A-resumable"] == 5
    assert results["forwards_per_request_B"] == 5


def test_probe_and_latency_token(results):
    assert results["probe_changes_answers"] == 0
    assert results["twin_latency_token_similarity"] < 1.0


def test_timings_are_recorded(results):
    for mode in ("A-naive", "A-resumable", "B"):
        assert results[f"step_time_s_{mode}"] > 0
        assert 0 < results[f"rollout_time_s_{mode}"] <= results[f"step_time_s_{mode}"]
    assert results["full_rollout_ms"] > 0 and results["prefill_ms"] > 0
    shares = [k for k in results if k.startswith("partial_share_p")]
    assert shares and results["partial_share_max"] == max(results[k] for k in shares)
    assert results["group_sequential_ms"] > 0 and results["group_batched_ms"] > 0
    assert results["sequential_over_batched"] == pytest.approx(results["group_sequential_ms"] / results["group_batched_ms"])


def test_quality_evaluation_shipped(results):
    assert results["sweep_present"] == 1
    assert "sweep_mode_A_minus_B_accuracy" in results
    assert -1.0 <= results["sweep_mode_A_minus_B_accuracy"] <= 1.0
