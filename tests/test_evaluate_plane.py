"""``python -m knoblib evaluate`` end to end on a few test requests: the plane's file and its comparisons."""

import json

import pytest

from knoblib.__main__ import main
from knoblib.assets import latency_table, load_samples
from knoblib.correctness import Correctness
from knoblib.data import data_path
from knoblib.plane import HullMix, per_request
from knoblib.vlm import KnobVLM


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    main(["evaluate", "--n", "30", "--val-n", "30", "--budgets", "3", "--controllers", str(data_path("controller_B")),
          "--out", str(out), "--overwrite"])
    return json.loads((out / "plane.json").read_text())


def test_the_plane_file_holds_every_policy_at_every_budget_and_target(plane):
    keys = {"policy", "kind", "x", "accuracy", "mean_latency_ms", "violation_rate"}
    assert all(keys <= set(p) for p in plane["points"])
    budgets = {p["x"] for p in plane["points"] if p["kind"] == "budget"}
    targets = {p["x"] for p in plane["points"] if p["kind"] == "target"}
    assert len(budgets) == 3 and len(targets) == 3
    for policy in ("lookup table", "per-request oracle", "controller (Mode B)"):
        assert {p["x"] for p in plane["points"] if p["policy"] == policy and p["kind"] == "budget"} == budgets
    for policy in ("static hull (random mix)", "per-request oracle", "controller (Mode B)"):
        assert {p["x"] for p in plane["points"] if p["policy"] == policy and p["kind"] == "target"} == targets
    assert all(len(vertex) == 2 for vertex in plane["hull"])
    # The table-based guard: no chosen configuration's median exceeds the budget.
    assert all(p["violation_rate"] == 0 for p in plane["points"] if p["policy"] in ("lookup table", "controller (Mode B)"))


def test_a_target_is_compared_with_the_hull_at_the_latency_the_controller_reached(plane):
    table = latency_table(KnobVLM.from_pretrained(data_path("model")), "shipped")
    val, test = (Correctness.load(data_path(f"correctness_{split}.safetensors")) for split in ("val", "test"))
    hull = HullMix.from_accuracy({k: v["all"] for k, v in val.accuracy().items()}, table)
    by_uid = {s.uid: s for s in load_samples("test")}
    samples = [by_uid[u] for u in test.uids][:30]
    for p in (p for p in plane["points"] if p["policy"] == "controller (Mode B)" and p["kind"] == "target"):
        right, _ = per_request(test, table, samples, hull.choose(p["mean_latency_ms"], len(samples), seed=0))
        assert p["accuracy_vs_baseline"][0] == pytest.approx(p["accuracy"] - float(right.mean()), abs=1e-6)
