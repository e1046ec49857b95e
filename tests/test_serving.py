"""The serving API: images in every accepted form, budgets, bad input, the one-JSON-line command.

Latencies are measured by the wall clock here, so only their existence and sign are
asserted, never their size (the machine may be slow or busy).
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from knoblib.controller import ControllerConfig, TwoStageController
from knoblib.latency import LatencyTable
from knoblib.serving import Answer, BudgetedVLM, load_image


def work(k) -> float:
    tier = {"low": 20.0, "medium": 26.0, "high": 32.0}[k.tier]
    return tier + 3.0 * k.num_active_blocks + 1.5 * (k.top_k * (8 - k.insertion_position) + 4 * k.insertion_position) / 8


@pytest.fixture(scope="module")
def served(tiny_vlm):
    space = tiny_vlm.knob_space
    table = LatencyTable(latency_ms={k: work(k) for k in space}, knob_space=space.as_dict())
    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.55, 1.1), mode="B"))
    return BudgetedVLM(tiny_vlm, controller, table, reserve_ms=0.0, monitor=False)


@pytest.fixture(scope="module")
def png(tmp_path_factory, samples):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(samples[0].image().permute(1, 2, 0).numpy()).save(path)
    return path


# --- images ------------------------------------------------------------------------------
def test_every_accepted_image_form_gives_the_same_pixels(png, samples):
    pixels = samples[0].image()
    assert torch.equal(load_image(png), pixels)
    assert torch.equal(load_image(str(png)), pixels)
    assert torch.equal(load_image(Image.open(png)), pixels)
    assert torch.equal(load_image(pixels.permute(1, 2, 0).numpy()), pixels)
    assert torch.equal(load_image(pixels), pixels)


def test_bad_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read an image from"):
        load_image(garbage)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 48)).save(big)
    with pytest.raises(ValueError, match="64x48 pixels: this model reads 48x48"):
        load_image(big)
    with pytest.raises(ValueError, match=r"shape \(48, 48\)"):
        load_image(np.zeros((48, 48), dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        load_image(np.zeros((48, 48, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(3, 48, 48\)"):
        load_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="file path, a PIL image"):
        load_image([1, 2, 3])


# --- answering ---------------------------------------------------------------------------
def test_answers_carry_text_knobs_and_the_measured_wall_clock(served, samples, png):
    images = [png, samples[1].image()]
    answers = served.answer(images, [samples[0].question, samples[1].question], 40.0)
    assert len(answers) == 2 and all(isinstance(a, Answer) for a in answers)
    for a in answers:
        assert isinstance(a.text, str) and a.knobs in set(served.vlm.knob_space)
        assert math.isfinite(a.latency_ms) and a.latency_ms > 0 and a.decision_ms >= 0
        assert a.budget_ms == 40.0 and a.table_latency_ms == served.table.latency(a.knobs)
        assert a.over_budget == (a.latency_ms > 40.0)
    line = json.dumps(answers[0].as_dict())
    assert json.loads(line)["knobs"] == answers[0].knobs.as_dict()


def test_one_budget_per_request(served, samples):
    budgets = [0.7 * served.table.reference_ms, served.table.reference_ms]
    answers = served.answer([s.image() for s in samples[:2]], [s.question for s in samples[:2]], budgets)
    assert [a.budget_ms for a in answers] == budgets
    # The guard holds each configuration to its budget (the table's p95 here equals its median).
    assert all(served.table.latency(a.knobs, served.quantile) <= b for a, b in zip(answers, budgets))


def test_a_budget_above_the_full_configuration_serves_it(served, samples):
    full = served.vlm.knob_space.full()
    for factor in (2, 10, 1000):
        (a,) = served.answer([samples[0].image()], [samples[0].question], factor * served.table.reference_ms)
        assert a.knobs == full


def test_unknown_words_are_reported(served, samples):
    (a,) = served.answer([samples[0].image()], ["what colour is the blorp ?"], 40.0)
    assert a.unknown_words == ["colour", "blorp"]


@pytest.mark.parametrize(
    "questions, budget, error, match",
    [
        (["   "], 40.0, ValueError, "question 0 is empty"),
        ([""], 40.0, ValueError, "question 0 is empty"),
        ("what color is the shape ?", 40.0, TypeError, "list of strings"),
        (["what color is the shape ?"], float("nan"), ValueError, "finite and > 0"),
        (["what color is the shape ?"], -5.0, ValueError, "finite and > 0"),
        (["what color is the shape ?"], 0, ValueError, "finite and > 0"),
        (["what color is the shape ?"], "40", ValueError, "strings"),
        (["what color is the shape ?"], [40.0, 50.0], ValueError, "2 budgets for 1 requests"),
        (["a ?", "b ?"], 40.0, ValueError, "1 images and 2 questions"),
    ],
)
def test_bad_requests_are_refused(served, samples, questions, budget, error, match):
    with pytest.raises(error, match=match):
        served.answer([samples[0].image()], questions, budget)


def test_a_single_image_must_be_wrapped(served, samples):
    with pytest.raises(TypeError, match="wrap a single image"):
        served.answer(samples[0].image(), ["what color is the shape ?"], 40.0)


def test_mode_a_serves_too(tiny_vlm, served, samples):
    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.55, 1.1), mode="A"))
    mode_a = BudgetedVLM(tiny_vlm, controller, served.table, reserve_ms=0.0, monitor=False)
    answers = mode_a.answer([s.image() for s in samples[:3]], [s.question for s in samples[:3]], 50.0)
    assert mode_a.mode == "A"
    assert all(served.table.latency(a.knobs, mode_a.quantile) <= 50.0 for a in answers)


def test_from_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no served-model folder"):
        BudgetedVLM.from_pretrained(tmp_path / "nowhere", table="shipped")
    with pytest.raises(ValueError, match="mode='C'"):
        BudgetedVLM.from_pretrained(mode="C")


@pytest.mark.slow
def test_the_answer_command_prints_one_json_line(png, capsys):
    from knoblib.__main__ import main

    main(["answer", "--image", str(png), "--question", "What color is the shape?", "--budget-ms", "1000", "--table", "shipped"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= {"text", "knobs", "latency_ms", "budget_ms", "over_budget", "unknown_words"}
    assert result["unknown_words"] == [] and result["budget_ms"] == 1000.0


# --- following the machine ------------------------------------------------------------------
def test_the_monitor_follows_a_machine_that_slows_down(tiny_vlm, served):
    from knoblib.serving import LatencyMonitor

    factors = {0.5: 1.0, 0.95: 1.1, 0.99: 1.15}
    table = LatencyTable(latency_ms=served.table.latency_ms, knob_space=served.table.knob_space, quantile_factors=factors)
    monitor = LatencyMonitor(table, 0.95, window=50, min_samples=10)
    knobs = tiny_vlm.knob_space.cheapest()
    for _ in range(9):
        monitor.observe(knobs, 2.0 * table.latency(knobs))
    assert monitor.slowdown == 1.0  # too few requests: the profile still rules
    monitor.observe(knobs, 2.0 * table.latency(knobs))
    assert monitor.tail_factor == pytest.approx(2.0) and monitor.slowdown == pytest.approx(2.0 / 1.1)
    for _ in range(50):  # the machine recovers: the window forgets the slow spell
        monitor.observe(knobs, table.latency(knobs))
    assert monitor.slowdown == pytest.approx(1.0 / 1.1)
    with pytest.raises(ValueError, match="min_samples"):
        LatencyMonitor(table, 0.95, window=5, min_samples=10)


def test_the_server_reads_drift_at_p90_and_the_guard_at_its_own_quantile(tiny_vlm, served):
    """The p99 of 200 requests is their second largest: the monitor reads p90 where the table keeps it."""
    from knoblib.evaluate import FullModelPolicy
    from knoblib.serving import MONITOR_QUANTILE, Server

    factors = {0.5: 1.0, 0.9: 1.05, 0.99: 1.15}
    table = LatencyTable(latency_ms=served.table.latency_ms, knob_space=served.table.knob_space, quantile_factors=factors)
    server = Server(tiny_vlm, FullModelPolicy(tiny_vlm.knob_space), table, quantile=0.99, reserve_ms=0.0)
    assert MONITOR_QUANTILE == 0.9 and server.monitor.quantile == 0.9 and server.quantile == 0.99
    no_p90 = LatencyTable(latency_ms=served.table.latency_ms, knob_space=served.table.knob_space,
                          quantile_factors={0.5: 1.0, 0.99: 1.15})
    assert Server(tiny_vlm, FullModelPolicy(tiny_vlm.knob_space), no_p90, quantile=0.99, reserve_ms=0.0).monitor.quantile == 0.99


def test_a_slower_machine_gets_cheaper_configurations(tiny_vlm, served, samples):
    """The server scales each budget by the monitor's slowdown before the policy reads the table."""
    from knoblib.evaluate import LookupTablePolicy
    from knoblib.serving import Server

    table = served.table
    accuracy = {k: {"all": table.latency(k)} for k in table.configs}  # slower = "better": the table takes what fits
    server = Server(tiny_vlm, LookupTablePolicy(table, accuracy), table, reserve_ms=0.0)
    budget = 0.95 * table.reference_ms  # the full configuration does not fit, and a choice remains 1.2x slower
    _, fresh, _, _ = server.serve(samples[0].image(), samples[0].question, budget)
    server.monitor.ratios.extend([1.2] * 100)  # as if the last 100 requests ran 1.2x their medians
    assert server.budget_for_table(budget) == pytest.approx(budget / 1.2)
    _, slowed, _, _ = server.serve(samples[0].image(), samples[0].question, budget)
    assert table.latency(slowed) < table.latency(fresh) <= budget
    assert table.min_ms < table.latency(slowed) <= budget / 1.2


def test_servers_that_compare_policies_share_one_drift_estimate(tiny_vlm, served):
    """The machine's drift is the machine's: a shared monitor gives every server the same budgets."""
    from knoblib.evaluate import FullModelPolicy, LookupTablePolicy
    from knoblib.serving import LatencyMonitor, Server

    table = served.table
    monitor = Server.new_monitor(table)
    accuracy = {k: {"all": table.latency(k)} for k in table.configs}
    a = Server(tiny_vlm, LookupTablePolicy(table, accuracy), table, reserve_ms=0.0, monitor=monitor)
    b = Server(tiny_vlm, FullModelPolicy(tiny_vlm.knob_space), table, reserve_ms=0.0, monitor=monitor)
    assert a.monitor is b.monitor is monitor
    for _ in range(50):  # requests served by a alone move b's budgets too
        a.monitor.observe(table.fastest(), 1.3 * table.latency(table.fastest()))
    budget = 0.9 * table.reference_ms
    assert a.budget_for_table(budget) == b.budget_for_table(budget) == pytest.approx(budget / monitor.slowdown)
    assert monitor.slowdown > 1.0
    other = LatencyTable(latency_ms=dict(table.latency_ms), knob_space=table.knob_space)
    with pytest.raises(ValueError, match="same latency table"):
        Server(tiny_vlm, FullModelPolicy(tiny_vlm.knob_space), other, reserve_ms=0.0, monitor=LatencyMonitor(table))


def test_the_reserve_is_the_typical_decision_not_one_preemption(monkeypatch):
    """A fake clock: 59 decisions of 0.4 ms and one of 5 ms (the process was preempted) reserve 0.4 ms."""
    from knoblib import serving

    durations = iter([0.4] + [0.4] * 30 + [5.0] + [0.4] * 29)  # the warm-up call, then 60 timed decisions
    now = [0.0]

    def clock():
        return now[0]

    class Policy:  # a static policy: decision_cost times choose_one
        def choose_one(self, budget_ms):
            now[0] += next(durations) / 1000.0

    monkeypatch.setattr(serving.time, "perf_counter", clock)
    policy = Policy()
    monkeypatch.setattr(serving, "decision_cost", lambda p: lambda q, b: p.choose_one(b))
    reserve = serving.measure_reserve(policy, ["q1", "q2", "q3"], [10.0, 20.0], repeats=10)
    assert reserve == pytest.approx(0.4)


# --- a target mean latency instead of a per-request budget ------------------------------------
def test_serving_at_a_target_mean_latency(tiny_vlm, served, samples, monkeypatch):
    from knoblib import assets

    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.55, 1.1), mode="B", max_price=2.0))
    priced = BudgetedVLM(tiny_vlm, controller, served.table, reserve_ms=0.0, monitor=False)
    monkeypatch.setattr(assets, "load_samples", lambda split, n=None: samples)  # validation questions for the price
    target = 0.5 * (served.table.min_ms + served.table.reference_ms)
    answers = priced.answer([s.image() for s in samples[:3]], [s.question for s in samples[:3]], target_mean_latency_ms=target)
    price = priced.price_for(target)
    assert 0.0 <= price <= 2.0 and all(a.budget_ms is None and a.price == price for a in answers)
    with pytest.raises(ValueError, match="either budget_ms"):
        priced.answer([samples[0].image()], [samples[0].question])
    with pytest.raises(ValueError, match="either budget_ms"):
        priced.answer([samples[0].image()], [samples[0].question], 40.0, target_mean_latency_ms=40.0)
    with pytest.raises(ValueError, match="no latency-price input"):
        served.answer([samples[0].image()], [samples[0].question], target_mean_latency_ms=40.0)
