"""The README's results table comes from the evaluation files, not from a hand-typed copy."""

import json

import pytest

from knoblib.__main__ import main
from knoblib.plane import PlanePoint
from knoblib.report import controller_summary, readme_table, report


def plane() -> dict:
    def point(kind, x, vs, saving):
        return PlanePoint(
            "controller B", kind, x, 0.8, x - 1.0, 0.0, seeds=3,
            accuracy_vs_baseline=vs, latency_saving_vs_baseline=saving,
        ).as_dict()

    points = [
        point("budget", 40.0, [0.002, -0.01, 0.014], [0.20, 0.15, 0.25]),
        point("budget", 60.0, [-0.004, -0.02, 0.01], [0.10, 0.05, 0.15]),
        point("target", 40.0, [0.125, 0.10, 0.15], [0.0, 0.0, 0.0]),
        point("target", 60.0, [-0.001, -0.01, 0.008], [0.0, 0.0, 0.0]),
        PlanePoint("lookup table", "budget", 40.0, 0.79, 38.0, 0.0).as_dict(),
    ]
    return {"points": points, "n": 1000, "reference_ms": 61.5, "quantile": 0.99}


def test_the_summary_picks_the_worst_budget_and_the_best_target():
    s = controller_summary(plane(), "controller B")
    assert s["seeds"] == 3
    assert s["worst_accuracy_vs_table"] == [-0.004, -0.02, 0.01]  # the 60 ms budget
    assert s["best_gain_over_hull"] == [0.125, 0.10, 0.15] and s["best_gain_target_ms"] == 40.0
    assert s["mean_latency_saving"] == pytest.approx(0.15)
    assert s["top_budget_latency_saving"] == [0.10, 0.05, 0.15]


def test_the_table_has_one_row_per_controller_and_the_measured_violations():
    measured = {"n": 200, "rows": [
        {"policy": "controller B", "budget_ms": 40.0, "violation_rate": 0.02},
        {"policy": "controller B", "budget_ms": 60.0, "violation_rate": 0.04},
    ]}
    text = readme_table(plane(), measured)
    rows = [line for line in text.splitlines() if line.startswith("| controller B")]
    assert len(rows) == 1 and "lookup table (" not in text
    assert "-0.4 [-2.0, +1.0]" in rows[0]  # worst per-request difference, in points
    assert "+12.5 [+10.0, +15.0] at 40 ms" in rows[0]
    assert "4.0 % at worst (3.0 % mean)" in rows[0]
    assert "200 test requests served one at a time at 2 budgets" in text


def test_report_reads_a_folder_and_names_what_is_missing(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="plane.json is missing"):
        report(tmp_path)
    (tmp_path / "plane.json").write_text(json.dumps(plane()))
    main(["report", str(tmp_path)])
    assert "| controller B (3) |" in capsys.readouterr().out
