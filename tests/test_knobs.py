"""The knob space: the scaled rule reproduces the MolmoE-1B table, and validation names the problem."""

import pytest

from knoblib.knobs import KNOB_FIELDS, TIERS, KnobConfig, KnobSpace


def molmoe_block_options(p, num_layers=16):
    """The original table, written literally: p + [max(11, rem - 4) .. min(15, rem)], rem = 16 - p."""
    rem = num_layers - p
    return tuple(p + r for r in range(max(11, rem - 4), min(15, rem) + 1))


def test_for_model_16_8_reproduces_the_molmoe_table():
    space = KnobSpace.for_model(16, 8)
    assert space.insertion_positions == (1, 2, 3, 4, 5)
    assert space.top_k_options == (4, 5, 6, 7, 8)
    assert space.tiers == TIERS == ("low", "medium", "high")
    expected = {1: range(12, 17), 2: range(13, 17), 3: range(14, 17), 4: range(15, 17), 5: range(16, 17)}
    for p in space.insertion_positions:
        assert space.block_options(p) == tuple(expected[p])
        assert space.block_options(p) == molmoe_block_options(p)
    assert space.all_block_options == (12, 13, 14, 15, 16)
    assert space.full() == KnobConfig("high", 5, 8, 16)
    assert space.cheapest() == KnobConfig("low", 1, 4, 12)
    # 3 tiers x 5 top-k x (5 + 4 + 3 + 2 + 1) block totals
    assert len(space) == 3 * 5 * 15


def test_for_model_8_4():
    space = KnobSpace.for_model(8, 4)
    assert space.num_layers == 8 and space.default_top_k == 4
    assert space.insertion_positions == (1, 2, 3)
    assert space.top_k_options == (2, 3, 4)
    assert space.block_options(1) == (6, 7, 8)
    assert space.block_options(2) == (7, 8)
    assert space.block_options(3) == (8,)
    assert len(space) == 54 == 3 * 3 * (3 + 2 + 1)
    configs = list(space)
    assert len(set(configs)) == 54
    assert all(space.validate(c) is c for c in configs)
    assert space.full() == KnobConfig("high", 3, 4, 8)
    assert space.cheapest() == KnobConfig("low", 1, 2, 6)
    assert space.full() in configs and space.cheapest() in configs


def test_knob_config_helpers():
    config = KnobConfig("high", 2, 4, 7)
    assert config.short() == "high/p2/k4/b7"
    assert config.as_dict() == {"tier": "high", "insertion_position": 2, "top_k": 4, "num_active_blocks": 7}
    assert KnobSpace.for_model(8, 4).as_dict()["tiers"] == list(TIERS)
    # The knob names are defined once, in the order a controller chooses them.
    assert KNOB_FIELDS == ("tier", "insertion_position", "top_k", "num_active_blocks") == tuple(config.as_dict())


@pytest.mark.parametrize(
    "config, field, value",
    [
        (KnobConfig("ultra", 1, 8, 16), "tier", "'ultra'"),
        (KnobConfig("high", 0, 8, 16), "insertion_position", "0"),
        (KnobConfig("high", 6, 8, 16), "insertion_position", "6"),
        (KnobConfig("high", 1, 3, 16), "top_k", "3"),
        (KnobConfig("high", 1, 9, 16), "top_k", "9"),
        (KnobConfig("high", 5, 8, 15), "num_active_blocks", "15"),
        (KnobConfig("high", 1, 8, 11), "num_active_blocks", "11"),
        (KnobConfig("high", 1, 8, 17), "num_active_blocks", "17"),
    ],
)
def test_validate_names_the_field_and_value(config, field, value):
    space = KnobSpace.for_model(16, 8)
    with pytest.raises(ValueError) as err:
        space.validate(config)
    message = str(err.value)
    assert f"{field}={value}" in message, message


@pytest.mark.parametrize(
    "args, field, value",
    [(("high", 1.0, 8, 16), "insertion_position", "1.0"), (("high", "1", 8, 16), "insertion_position", "'1'"),
     (("high", True, 8, 16), "insertion_position", "True")],
)
def test_knob_config_refuses_values_of_the_wrong_type(args, field, value):
    # Types are checked when the configuration is made (KnobConfig's docstring), before any space sees it.
    with pytest.raises(ValueError) as err:
        KnobConfig(*args)
    assert f"{field}={value}" in str(err.value)


def test_validate_rejects_non_configs():
    space = KnobSpace.for_model(16, 8)
    for bad in (("high", 1, 8, 16), {"tier": "high"}, None):
        with pytest.raises(TypeError, match="KnobConfig"):
            space.validate(bad)


def test_block_options_rejects_bad_insertion_position():
    space = KnobSpace.for_model(16, 8)
    with pytest.raises(ValueError, match="insertion_position=6"):
        space.block_options(6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_layers=1, default_top_k=8, max_insertion_position=1, max_dropped_blocks=0), "num_layers"),
        (dict(num_layers=16, default_top_k=0, max_insertion_position=5, max_dropped_blocks=4), "default_top_k"),
        (dict(num_layers=16, default_top_k=8, max_insertion_position=0, max_dropped_blocks=4), "max_insertion_position"),
        (dict(num_layers=16, default_top_k=8, max_insertion_position=16, max_dropped_blocks=4), "max_insertion_position"),
        (dict(num_layers=16, default_top_k=8, max_insertion_position=5, max_dropped_blocks=-1), "max_dropped_blocks"),
        (dict(num_layers=16, default_top_k=8, max_insertion_position=5, max_dropped_blocks=15), "max_dropped_blocks"),
        (dict(num_layers=16, default_top_k=8, max_insertion_position=5, max_dropped_blocks=4, tiers=("low",)), "tiers"),
    ],
)
def test_knob_space_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}="):
        KnobSpace(**kwargs)


@pytest.mark.parametrize("num_layers, default_top_k", [(2, 1), (3, 2), (8, 4), (12, 6), (16, 8), (24, 8)])
def test_for_model_scales_consistently(num_layers, default_top_k):
    space = KnobSpace.for_model(num_layers, default_top_k)
    assert space.block_options(space.max_insertion_position) == (num_layers,)
    for p in space.insertion_positions:
        options = space.block_options(p)
        assert options[-1] == num_layers and options[0] >= p + 1
    assert min(space.top_k_options) >= 1 and max(space.top_k_options) == default_top_k
    assert space.validate(space.full()) and space.validate(space.cheapest())


def test_with_full_stage2_keeps_stage1_and_maxes_stage2():
    space = KnobSpace.for_model(8, 4)
    for knobs in space:
        full2 = space.with_full_stage2(knobs)
        assert (full2.tier, full2.insertion_position) == (knobs.tier, knobs.insertion_position)
        assert (full2.top_k, full2.num_active_blocks) == (4, 8)
    with pytest.raises(ValueError, match="top_k"):
        space.with_full_stage2(KnobConfig("low", 1, 9, 8))


def test_pretrain_config_rejects_bad_stage2_fraction():
    from knoblib.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="stage2_full_fraction"):
        PretrainConfig(stage2_full_fraction=1.5)
