"""Tests for knoblib.latency: profiling, the latency table file, budget sampling.

Timing values are never asserted beyond finiteness and positivity: the machine may be busy.
"""

import json
import math
import os

import pytest
import torch

from knoblib.data import generate_split
from knoblib.knobs import KnobConfig, KnobSpace
from knoblib.latency import (
    FILE_FORMAT,
    FILE_VERSION,
    PROFILE_COMMAND,
    QUANTILES,
    BudgetSampler,
    LatencyTable,
    check_budgets,
    machine_fingerprint,
    machine_info,
    model_fingerprint,
    pooled_quantile_factors,
    profile_latency,
)
from knoblib.vlm import KnobVLM

@pytest.fixture(scope="module")
def vlm(tiny_config, tokenizer):
    """A fresh tiny model of this module's own."""
    return KnobVLM.from_config(tiny_config, tokenizer, seed=0)


@pytest.fixture(scope="module")
def profile_configs(vlm):
    space = vlm.knob_space
    return [space.cheapest(), space.full(), KnobConfig("medium", 2, 3, 7)]


@pytest.fixture(scope="module")
def profiled(vlm, profile_configs):
    samples = generate_split(3, seed=5)
    return profile_latency(vlm, samples, answer_tokens=2, repeats=2, warmup=1, configs=profile_configs, progress=False)


SPACE = KnobSpace.for_model(8, 4)
A = KnobConfig("low", 1, 2, 6)
B = KnobConfig("low", 3, 4, 8)
C = KnobConfig("medium", 2, 3, 7)
D = KnobConfig("high", 3, 4, 8)


def synthetic_latency(k: KnobConfig) -> float:
    """Made-up latencies for every configuration of SPACE (the full one is the slowest, 100 ms)."""
    cost = {"low": 40.0, "medium": 60.0, "high": 88.0}
    experts = (k.top_k * (8 - k.insertion_position) + 4 * k.insertion_position) / 8  # top_k applies from block p on
    return cost[k.tier] + 2.0 * (k.num_active_blocks - 6) + 2.0 * experts


@pytest.fixture
def full_table():
    """A synthetic table with every configuration of SPACE and a tail (p95 = 1.1x the median)."""
    return LatencyTable(
        latency_ms={k: synthetic_latency(k) for k in SPACE},
        knob_space=SPACE,
        quantile_factors={0.5: 1.0, 0.9: 1.05, 0.95: 1.1, 0.99: 1.2},
        machine=machine_info(),
        model_id="synthetic",
    )


@pytest.fixture
def table():
    """A hand-built partial table with made-up numbers (B and C tie at 20 ms)."""
    return LatencyTable(
        latency_ms={D: 40.0, B: 20.0, A: 10.0, C: 20.0},
        knob_space=SPACE,
        iqr_ms={A: 1.0, B: 0.5, C: 0.0, D: 2.0},
        vision_ms={"low": 2.0, "high": 8.0},
        answer_tokens=4,
    )


# --- profiling ------------------------------------------------------------------------
def test_profile_gives_finite_positive_latencies_and_metadata(profiled, profile_configs, vlm):
    assert profiled.configs == profile_configs
    lat = profiled.latencies(profile_configs)
    assert lat.shape == (3,) and lat.dtype == torch.float64
    assert torch.isfinite(lat).all() and (lat > 0).all()
    assert all(math.isfinite(v) and v >= 0 for v in profiled.iqr_ms.values())
    assert set(profiled.iqr_ms) == set(profile_configs)
    assert set(profiled.vision_ms) == {"low", "medium", "high"}
    assert all(math.isfinite(v) and v > 0 for v in profiled.vision_ms.values())
    assert profiled.answer_tokens == 2 and profiled.repeats == 2 and profiled.warmup == 1
    assert profiled.knob_space == vlm.knob_space.as_dict()
    assert profiled.model_id == model_fingerprint(vlm)
    assert set(profiled.quantile_factors) == set(QUANTILES)
    assert len(profiled.samples) == 3
    assert profiled.date
    m = profiled.machine
    assert m["torch"] == torch.__version__
    assert m["torch_num_threads"] == torch.get_num_threads()
    assert m["cpu_count"] == os.cpu_count()
    assert {"machine", "processor", "python"} <= set(m)
    assert not any("host" in key for key in m)
    profiled.check_space(vlm.knob_space)


def test_profile_validates_arguments(vlm):
    samples = generate_split(1, seed=5)
    with pytest.raises(ValueError, match="repeats"):
        profile_latency(vlm, samples, repeats=0, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        profile_latency(vlm, samples, configs=[KnobConfig("low", 1, 99, 8)], progress=False)
    with pytest.raises(ValueError, match="sample"):
        profile_latency(vlm, [], configs=[vlm.knob_space.full()], progress=False)


# --- save / load ----------------------------------------------------------------------
def test_save_load_round_trip(profiled, full_table, tmp_path):
    path = full_table.save(tmp_path / "full.json")
    assert LatencyTable.load(path) == full_table
    # A partial profile (three configurations) loads only when asked: served tables are complete.
    path = profiled.save(tmp_path / "sub" / "latency.json")
    with pytest.raises(ValueError, match="lacks 51 of the 54 configurations"):
        LatencyTable.load(path)
    loaded = LatencyTable.load(path, complete=False)
    assert loaded == profiled
    assert loaded.configs == profiled.configs
    assert loaded.source == str(path)
    assert loaded.to_rows() == profiled.to_rows()


def test_save_is_atomic_and_leaves_no_tmp(table, tmp_path):
    path = tmp_path / "latency.json"
    path.write_text("old")
    table.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]
    assert json.loads(path.read_text())["format"] == FILE_FORMAT


def test_load_missing_names_path_and_command(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as err:
        LatencyTable.load(path)
    assert str(path) in str(err.value) and PROFILE_COMMAND in str(err.value)


def _write_variant(table, tmp_path, edit):
    data = table.to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d["rows"][0].update(latency_ms=-1.0), "latency"),
        (lambda d: d["rows"][0].update(latency_ms=float("nan")), "latency"),
        (lambda d: d.update(version=FILE_VERSION + 1), "version"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.pop("rows"), "missing"),
        (lambda d: d["rows"][0].pop("top_k"), "missing"),
        (lambda d: d["rows"][0].update(top_k=99), "top_k"),
        (lambda d: d["rows"].append(dict(d["rows"][0])), "repeats"),
        (lambda d: d["knob_space"].update(num_layers=1), "knob_space"),
        (lambda d: d["rows"][0].update(iqr_ms=-2.0), "IQR"),
        (lambda d: d["rows"].pop(3), "lacks 1 of the 54 configurations"),
        (lambda d: d.update(quantile_factors={"0.5": 1.0, "0.9": 0.8}), "quantile_factors"),
        (lambda d: d.update(quantile_factors={"0.5": 1.0, "0.9": 1.3, "0.99": 1.1}), "must not decrease"),
    ],
)
def test_load_rejects_bad_content_naming_path(full_table, tmp_path, edit, problem):
    path = _write_variant(full_table, tmp_path, edit)
    with pytest.raises(ValueError, match=problem) as err:
        LatencyTable.load(path)
    assert str(path) in str(err.value)


def test_load_rejects_corrupt_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "knoblib-latency-table", ')
    with pytest.raises(ValueError, match="JSON") as err:
        LatencyTable.load(path)
    assert str(path) in str(err.value)


# --- lookups and logic (hand-built table) ---------------------------------------------
def test_unknown_config_is_a_keyerror_saying_reprofile(table):
    unknown = KnobConfig("high", 1, 2, 6)
    with pytest.raises(KeyError, match="re-profile") as err:
        table.latency(unknown)
    assert unknown.short() in str(err.value)
    with pytest.raises(KeyError):
        table.latencies([A, unknown])
    assert unknown not in table and A in table


def test_check_space_mismatch(table):
    table.check_space(SPACE)
    with pytest.raises(ValueError, match="another model"):
        table.check_space(KnobSpace.for_model(16, 8))


def test_min_max_fastest_slowest(table):
    assert table.min_ms == 10.0 and table.max_ms == 40.0
    assert table.fastest() == A and table.slowest() == D
    assert table.latencies([D, A]).tolist() == [40.0, 10.0]
    assert len(table) == 4 and table.configs == [D, B, A, C]
    assert set(table.missing(SPACE)) == set(SPACE) - {A, B, C, D}


def test_feasible_is_fastest_first_and_inclusive(table):
    assert table.feasible(5.0) == []
    assert table.feasible(10.0) == [A]
    # Ties (B and C at 20 ms) are ordered by the configuration, deterministically.
    assert table.feasible(20.0) == [A] + sorted([B, C])
    assert table.feasible(1e9) == [A] + sorted([B, C]) + [D]


def test_to_rows(table):
    rows = table.to_rows()
    assert len(rows) == 4
    first = rows[0]
    assert set(first) == {
        "tier", "insertion_position", "top_k", "num_active_blocks", "latency_ms", "p90_ms", "p99_ms", "vision_ms", "iqr_ms"
    }
    assert first["p99_ms"] == first["latency_ms"]  # a hand-built table has no measured spread
    assert first["tier"] == "high" and first["latency_ms"] == 40.0 and first["vision_ms"] == 8.0 and first["iqr_ms"] == 2.0
    assert next(r for r in rows if r["tier"] == "medium")["vision_ms"] is None


def test_constructor_rejects_bad_latencies():
    with pytest.raises(ValueError):
        LatencyTable(latency_ms={A: float("nan")}, knob_space=SPACE)
    with pytest.raises(ValueError):
        LatencyTable(latency_ms={A: -3.0}, knob_space=SPACE)
    with pytest.raises(ValueError):
        LatencyTable(latency_ms={}, knob_space=SPACE)


# --- budgets --------------------------------------------------------------------------
def test_budget_sampler_range(table):
    sampler = BudgetSampler(table, margin=0.1, seed=0)
    assert sampler.low == pytest.approx(9.0) and sampler.high == pytest.approx(44.0)
    budgets = sampler.sample(2000)
    assert budgets.shape == (2000,) and budgets.dtype == torch.float64
    assert budgets.min() >= sampler.low - 1e-4 and budgets.max() <= sampler.high + 1e-4
    # Both ends are reached: some budgets are below the fastest, some above the slowest.
    assert (budgets < table.min_ms).any() and (budgets > table.max_ms).any()
    assert sampler.sample(0).shape == (0,)


def test_budget_sampler_reproducible_and_independent_of_global_rng(table):
    torch.manual_seed(1)
    a = BudgetSampler(table, seed=3).sample(16)
    torch.manual_seed(2)
    b = BudgetSampler(table, seed=3).sample(16)
    assert torch.equal(a, b)
    assert not torch.equal(a, BudgetSampler(table, seed=4).sample(16))
    sampler = BudgetSampler(table, seed=3)
    first = sampler.sample(4)
    assert not torch.equal(first, sampler.sample(4))
    sampler.reset()
    assert torch.equal(first, sampler.sample(4))


def test_budget_sweep_endpoints(table):
    sweep = BudgetSampler(table).sweep(5)
    assert sweep.shape == (5,)
    assert sweep[0].item() == pytest.approx(table.min_ms) and sweep[-1].item() == pytest.approx(table.max_ms)
    assert (sweep[1:] > sweep[:-1]).all()
    with pytest.raises(ValueError):
        BudgetSampler(table).sweep(1)


def test_budget_sampler_relative_range(full_table):
    sampler = BudgetSampler(full_table, margin=0.1)
    lo, hi = sampler.relative_range
    assert lo == pytest.approx(0.9 * full_table.min_ms / 100.0) and hi == pytest.approx(1.1)
    # A machine 4x slower has the same relative range: that is what the controller learns.
    assert BudgetSampler(full_table.scaled(4.0)).relative_range == pytest.approx((lo, hi))


# --- quantiles, relative budgets, fingerprints -----------------------------------------
def test_quantiles_scale_the_median(full_table):
    k = SPACE.cheapest()
    assert full_table.latency(k) == synthetic_latency(k)
    assert full_table.latency(k, 0.95) == pytest.approx(1.1 * synthetic_latency(k))
    assert full_table.latencies([k], 0.99).tolist() == pytest.approx([1.2 * synthetic_latency(k)])
    assert full_table.feasible(synthetic_latency(k), 0.95) == []
    with pytest.raises(ValueError, match=r"quantile=0.8 is not in this latency table: allowed \[0.5, 0.9, 0.95, 0.99\]"):
        full_table.latency(k, 0.8)
    rows = full_table.to_rows()
    assert rows[0]["p99_ms"] == pytest.approx(1.2 * rows[0]["latency_ms"])


def test_relative_budgets_are_fractions_of_the_full_configuration(full_table):
    assert full_table.reference_ms == synthetic_latency(SPACE.full()) == 100.0
    assert full_table.relative(75.0) == 0.75 and full_table.absolute(0.75) == 75.0
    slow = full_table.scaled(4.0)
    assert slow.reference_ms == 400.0 and slow.relative(300.0) == 0.75
    assert slow.relative(torch.tensor([400.0])).tolist() == [1.0]
    with pytest.raises(ValueError, match="factor"):
        full_table.scaled(0.0)


def test_pooled_quantile_factors():
    # Two configurations, each spread +-10 % around its median: the pooled tail is relative.
    times = {A: [9.0, 10.0, 11.0] * 10, B: [18.0, 20.0, 22.0] * 10}
    factors = pooled_quantile_factors(times)
    assert factors[0.5] == 1.0
    assert 1.0 <= factors[0.75] <= factors[0.9] <= factors[0.95] <= factors[0.99] <= 1.1 + 1e-9
    assert factors[0.99] == pytest.approx(1.1)


def test_machine_fingerprint_ignores_volatile_fields():
    info = machine_info()
    same = {**info, "load_avg_start": 3.0, "python": "0.0"}
    assert machine_fingerprint(info) == machine_fingerprint(same)
    assert machine_fingerprint(info) != machine_fingerprint({**info, "torch_num_threads": 99})
    assert machine_fingerprint(info) != machine_fingerprint({**info, "cpu_model": "another CPU"})


def test_shipped_table_has_no_paths_and_is_complete():
    from knoblib.data import data_path

    text = data_path("latency_table.json").read_text()
    assert str(data_path()) not in text and '"/' not in text
    table = LatencyTable.load(data_path("latency_table.json"))
    assert not table.missing() and table.model_id and table.answer_tokens == 2
    assert set(table.quantile_factors) >= {0.5, 0.9, 0.99}


def test_profile_with_a_synthetic_clock_times_nothing(vlm):
    """The measurement is injectable: a machine 3x slower than a made-up table, with no clock at all."""
    calls = []

    def measure(knobs, image, question):
        calls.append(knobs)
        return 3.0 * synthetic_latency(knobs)

    configs = [SPACE.cheapest(), SPACE.full()]
    table = profile_latency(vlm, generate_split(2, seed=1), repeats=3, warmup=1, configs=configs, progress=False, measure=measure)
    assert len(calls) == 4 * 2
    assert table.latency(SPACE.full()) == 300.0 and table.quantile_factors[0.99] == 1.0
    assert table.vision_ms == {}  # vision is timed only with the real clock


def test_check_budgets_names_the_bad_rows():
    assert check_budgets([1, 2.5]).tolist() == [1.0, 2.5]
    for bad, match in [
        ([1.0, float("nan")], r"rows \[1\]"),
        ([-1.0], "finite and > 0"),
        ([0.0], "finite and > 0"),
        (["20"], "strings"),
        ("20", "strings"),
        ([], "empty"),
        ([[1.0]], "1-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_budgets(bad)


@pytest.mark.parametrize("margin", [-0.1, 1.0, 1.5, float("nan")])
def test_budget_sampler_rejects_bad_margin(table, margin):
    with pytest.raises(ValueError, match="margin"):
        BudgetSampler(table, margin=margin)


def test_serving_threads_follows_omp_num_threads_else_one(monkeypatch):
    from knoblib.latency import serving_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert serving_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert serving_threads() == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads=0 is invalid"):
            serving_threads(0)
    finally:
        torch.set_num_threads(before)
