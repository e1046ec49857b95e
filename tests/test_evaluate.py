"""The family-aware oracle bound against the lookup table, on hand-made accuracies."""

import pytest

from knoblib.data import FAMILIES
from knoblib.evaluate import LookupTablePolicy, family_oracle_gap
from knoblib.knobs import KnobConfig, KnobSpace
from knoblib.latency import LatencyTable


@pytest.fixture()
def two_config_case():
    """Two configurations of equal latency: one good for mark, one good for count."""
    space = KnobSpace.for_model(8, 4)
    a = KnobConfig("high", 1, 4, 6)
    b = KnobConfig("medium", 1, 4, 8)
    latency = {k: 30.0 for k in space}
    latency[a] = latency[b] = 20.0
    table = LatencyTable(latency_ms=latency, knob_space=space.as_dict())
    acc = {k: {"all": 0.0, **{f: 0.0 for f in FAMILIES}} for k in space}
    acc[a] = {"all": 0.6, "color": 1.0, "mark": 1.0, "binding": 0.2, "count": 0.2}
    acc[b] = {"all": 0.55, "color": 1.0, "mark": 0.2, "binding": 0.2, "count": 0.8}
    return table, acc, a, b


def test_oracle_picks_per_family_and_bounds_the_lookup(two_config_case):
    table, acc, a, b = two_config_case
    (row,) = family_oracle_gap(table, acc, [20.0])
    assert row["lookup"] == a.short() == LookupTablePolicy(table, acc).choose_one(20.0).short()
    assert row["lookup_accuracy"] == pytest.approx(0.6)
    assert row["oracle"] == {"color": a.short(), "mark": a.short(), "binding": a.short(), "count": b.short()}
    assert row["oracle_accuracy"] == pytest.approx((1.0 + 1.0 + 0.2 + 0.8) / 4)


def test_oracle_equals_lookup_when_everything_fits(two_config_case):
    table, acc, a, _ = two_config_case
    for k in acc:
        acc[k] = {"all": 0.1, **{f: 0.1 for f in FAMILIES}}
    acc[a] = {"all": 0.9, **{f: 0.9 for f in FAMILIES}}
    (row,) = family_oracle_gap(table, acc, [100.0])
    assert row["oracle_accuracy"] == pytest.approx(row["lookup_accuracy"]) == pytest.approx(0.9)


def test_family_table_departs_from_the_table_only_for_a_strict_gain(two_config_case):
    from knoblib.evaluate import FamilyTablePolicy

    table, acc, a, b = two_config_case
    policy = FamilyTablePolicy(table, acc)
    # color is tied between a and b: the tie goes to the table's choice (a), not to b.
    assert policy.choose_one("color", 20.0) == a == LookupTablePolicy(table, acc).choose_one(20.0)
    assert policy.choose_one("count", 20.0) == b
    assert policy.choose_one("mark", 20.0) == a
    # Nothing fits: the fastest configuration, like the lookup table.
    assert policy.choose_one("count", 1.0) == table.fastest()
    with pytest.raises(ValueError, match="family='shape'"):
        policy.choose_one("shape", 20.0)


def test_oracle_choices_scored_on_another_split(two_config_case):
    table, acc, a, b = two_config_case
    other = {k: dict(v) for k, v in acc.items()}
    other[b]["count"] = 0.1  # on the other split, count's own pick is worse than the table's
    (row,) = family_oracle_gap(table, acc, [20.0], score_accuracy=other)
    assert row["lookup_score"] == pytest.approx(other[a]["all"])
    assert row["oracle_score"] == pytest.approx((1.0 + 1.0 + 0.2 + 0.1) / 4)
