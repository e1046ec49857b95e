"""On-machine calibration, with a synthetic clock: which table is trusted, what is profiled, what is cached.

Nothing here times anything: ``measure`` stands in for the wall clock (a machine as fast
as the table, or 4x slower), so the logic is tested the same on every machine.
"""

import json
from dataclasses import replace

import pytest
import torch

from knoblib.calibration import (
    SpotCheck,
    cache_path,
    default_cache_dir,
    local_latency_table,
    spot_check,
    spot_check_configs,
)
from knoblib.controller import ControllerConfig, TwoStageController
from knoblib.decision import GreedyDecider
from knoblib.features import LanguageFeatureExtractor
from knoblib.guard import BudgetGuard
from knoblib.latency import LatencyTable, machine_fingerprint, machine_info, model_fingerprint


def work(k) -> float:
    """Made-up latencies proportional to the work of each configuration (ms)."""
    tier = {"low": 20.0, "medium": 26.0, "high": 32.0}[k.tier]
    experts = (k.top_k * (8 - k.insertion_position) + 4 * k.insertion_position) / 8
    return tier + 3.0 * k.num_active_blocks + 1.5 * experts


@pytest.fixture(scope="module")
def shipped(tiny_vlm):
    """The table 'shipped' with the model: made on this machine's fingerprint, for this model."""
    space = tiny_vlm.knob_space
    return LatencyTable(
        latency_ms={k: work(k) for k in space},
        knob_space=space.as_dict(),
        quantile_factors={0.5: 1.0, 0.9: 1.05, 0.95: 1.08, 0.99: 1.15},
        machine=machine_info(),
        model_id=model_fingerprint(tiny_vlm),
    )


def clock(speed: float, calls: list | None = None):
    """A synthetic ``measure``: every configuration takes ``speed`` times its made-up work."""

    def measure(knobs, image, question):
        if calls is not None:
            calls.append(knobs)
        return speed * work(knobs)

    return measure


def calibrate(vlm, shipped, samples, tmp_path, speed, calls=None):
    lines = []
    table = local_latency_table(
        vlm, shipped, samples[:2], cache_dir=tmp_path, measure=clock(speed, calls), progress=False,
        log=lines.append, profile_kwargs={"repeats": 3, "warmup": 0},
    )
    return table, lines


def test_a_table_that_holds_is_used_as_it_is(tiny_vlm, shipped, samples, tmp_path):
    calls = []
    table, lines = calibrate(tiny_vlm, shipped, samples, tmp_path, 1.1, calls)
    assert table is shipped
    assert len(lines) == 1 and "the shipped table holds" in lines[0] and "1.10x" in lines[0]
    assert set(calls) == set(spot_check_configs(shipped))  # only the spot check ran
    assert not (tmp_path / "latency").exists()


def test_a_machine_4x_slower_is_profiled_and_cached_never_over_the_shipped_file(tiny_vlm, shipped, samples, tmp_path):
    shipped_file = shipped.save(tmp_path / "shipped.json")
    before = shipped_file.read_bytes()
    table, lines = calibrate(tiny_vlm, LatencyTable.load(shipped_file), samples, tmp_path / "cache", 4.0)
    assert len(lines) == 1 and "profiled this machine" in lines[0] and "4.00x its medians" in lines[0]
    for k in tiny_vlm.knob_space:
        assert table.latency(k) == pytest.approx(4.0 * work(k))
    # The relative budgets the controller sees are unchanged: the full configuration is 4x slower too.
    assert table.reference_ms == pytest.approx(4.0 * shipped.reference_ms)
    cached = cache_path(tmp_path / "cache", model_fingerprint(tiny_vlm), machine_fingerprint(machine_info()))
    assert cached.is_file() and str(cached) in lines[0]
    assert shipped_file.read_bytes() == before

    # Next time the cached table is trusted (its spot check agrees) and nothing is profiled.
    calls = []
    again, lines = calibrate(tiny_vlm, shipped, samples, tmp_path / "cache", 4.0, calls)
    assert "the cached table" in lines[0] and "holds" in lines[0]
    assert again == table and set(calls) == set(spot_check_configs(table))


def test_another_machine_fingerprint_is_profiled_without_a_spot_check(tiny_vlm, shipped, samples, tmp_path):
    foreign = replace(shipped, machine={**shipped.machine, "cpu_model": "Another CPU"})
    calls = []
    table, lines = calibrate(tiny_vlm, foreign, samples, tmp_path, 1.0, calls)
    assert "measured on another machine (Another CPU" in lines[0]
    assert table is not foreign and len(calls) == 3 * len(tiny_vlm.knob_space)  # the profile, no spot check


def test_a_table_of_another_model_is_profiled(tiny_vlm, shipped, samples, tmp_path):
    other = LatencyTable(
        latency_ms=shipped.latency_ms, knob_space=shipped.knob_space, machine=shipped.machine, model_id="another"
    )
    _, lines = calibrate(tiny_vlm, other, samples, tmp_path, 1.0)
    assert "profiled for another model" in lines[0]


def test_no_table_at_all_is_profiled(tiny_vlm, samples, tmp_path):
    table, lines = calibrate(tiny_vlm, None, samples, tmp_path, 2.0)
    assert "no latency table was given" in lines[0]
    assert table.latency(tiny_vlm.knob_space.full()) == pytest.approx(2.0 * work(tiny_vlm.knob_space.full()))


def test_an_unreadable_cache_is_reported_and_profiled_again(tiny_vlm, shipped, samples, tmp_path):
    cached = cache_path(tmp_path, model_fingerprint(tiny_vlm), machine_fingerprint(machine_info()))
    cached.parent.mkdir(parents=True)
    cached.write_text("{broken")
    table, lines = calibrate(tiny_vlm, shipped, samples, tmp_path, 3.0)
    assert "ignoring the unreadable cache" in lines[0]
    assert "3.00x its medians" in lines[-1]
    assert json.loads(cached.read_text())["format"] == "knoblib-latency-table"


def test_spot_check_tolerance():
    check = SpotCheck(configs=[], table_ms=[10.0, 20.0], measured_ms=[12.0, 19.0])
    assert check.ratios == pytest.approx([1.2, 0.95]) and check.agrees(0.25) and not check.agrees(0.1)
    assert not SpotCheck([], [10.0], [7.9]).agrees(0.25)  # 0.79x is outside 1 / 1.25
    with pytest.raises(ValueError, match="tolerance"):
        local_latency_table(None, None, [], tolerance=0.0)


def test_spot_check_times_three_points_across_the_range(tiny_vlm, shipped, samples):
    configs = spot_check_configs(shipped)
    assert configs[0] == shipped.fastest() and configs[-1] == tiny_vlm.knob_space.full() and len(configs) == 3
    check = spot_check(tiny_vlm, shipped, samples[:2], repeats=3, measure=clock(2.0))
    assert check.ratio == pytest.approx(2.0)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KNOBLIB_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KNOBLIB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "knoblib"


@pytest.mark.parametrize("mode", ["A", "B"])
def test_a_relative_budget_gets_the_same_configuration_on_a_4x_slower_machine(tiny_vlm, shipped, samples, mode):
    """What makes shipped controllers serve anywhere: the same fraction of this machine's full latency, the same knobs."""
    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.6, 1.1), mode=mode, seed=3)).eval()
    language = LanguageFeatureExtractor.from_vlm(tiny_vlm)
    slow = shipped.scaled(4.0)
    here = GreedyDecider(controller, language, shipped.reference_ms, BudgetGuard(shipped, tiny_vlm.knob_space))
    there = GreedyDecider(controller, language, slow.reference_ms, BudgetGuard(slow, tiny_vlm.knob_space))
    token = torch.randn(1, tiny_vlm.hidden_size)
    with torch.inference_mode():
        for s in samples:
            for fraction in (0.65, 0.8, 0.95):
                choices = []
                for decider, table in ((here, shipped), (there, slow)):
                    budget = fraction * table.reference_ms
                    fitting = decider.fitting(budget)
                    shared = decider.features(s.question, budget)
                    tier, position = decider.stage1(shared, fitting)
                    rest = decider.stage2(tier, position, fitting, shared if mode == "B" else None, token)
                    choices.append(decider.knobs(tier, position, *rest))
                assert choices[0] == choices[1]
