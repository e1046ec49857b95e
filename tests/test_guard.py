"""The budget guard: one joint mask per request equals brute force; each choice's slice is right; guarded choices fit."""

import pytest
import torch

from knoblib.controller import ControllerConfig, Decisions, TwoStageController
from knoblib.guard import BudgetGuard, block_options, position_options, tier_options, top_k_options
from knoblib.knobs import KnobSpace
from knoblib.latency import LatencyTable


@pytest.fixture(scope="module")
def space():
    return KnobSpace.for_model(8, 4)


@pytest.fixture(scope="module")
def table(space):
    cost = {"low": 10.0, "medium": 20.0, "high": 35.0}
    latency = {
        k: cost[k.tier] + 4.0 * k.num_active_blocks + 2.0 * k.top_k * (8 - k.insertion_position) + 0.1 * k.insertion_position
        for k in space
    }
    return LatencyTable(latency_ms=latency, knob_space=space.as_dict(), quantile_factors={0.5: 1.0, 0.95: 1.2, 0.99: 1.3})


def index(space, k):
    return (
        space.tiers.index(k.tier),
        space.insertion_positions.index(k.insertion_position),
        space.top_k_options.index(k.top_k),
        space.all_block_options.index(k.num_active_blocks),
    )


@pytest.mark.parametrize("quantile", [0.5, 0.95, 0.99])
def test_mask_matches_brute_force(space, table, quantile):
    guard = BudgetGuard(table, space, quantile)
    budgets = torch.tensor([table.min_ms, 60.0, 75.0, 1.2 * table.max_ms, 1.0])
    mask = guard.mask(budgets)
    assert mask.shape == (5, 3, 3, 3, 3)
    fastest = min(table.latency(k, quantile) for k in space)
    for row, budget in enumerate(budgets.tolist()):
        fits = {k for k in space if table.latency(k, quantile) <= max(budget, fastest)}
        assert {k for k in space if mask[(row, *index(space, k))]} == fits
        assert int(mask[row].sum()) == len(fits)  # block totals p forbids are never open
    # Nothing fits a 1 ms budget: only the fastest configuration stays open.
    assert int(mask[4].sum()) == 1 and bool(mask[(4, *index(space, table.fastest()))])


def test_each_choice_takes_its_slice(space, table):
    guard = BudgetGuard(table, space)
    budgets = torch.tensor([85.0, 95.0, 110.0])
    mask = guard.mask(budgets)
    fits = [[k for k in space if table.latency(k, 0.99) <= b] for b in budgets.tolist()]
    for row, feasible in enumerate(fits):
        one = mask[row : row + 1]
        assert tier_options(one)[0].tolist() == [any(k.tier == t for k in feasible) for t in space.tiers]
        for t, tier in enumerate(space.tiers):
            expected = [any(k.tier == tier and k.insertion_position == p for k in feasible) for p in space.insertion_positions]
            assert position_options(one, torch.tensor([t]))[0].tolist() == expected
            for pi, p in enumerate(space.insertion_positions):
                under = [k for k in feasible if k.tier == tier and k.insertion_position == p]
                got = top_k_options(one, torch.tensor([t]), torch.tensor([pi]))[0].tolist()
                assert got == [any(k.top_k == x for k in under) for x in space.top_k_options]
                for ki, topk in enumerate(space.top_k_options):
                    got = block_options(one, torch.tensor([t]), torch.tensor([pi]), torch.tensor([ki]))[0].tolist()
                    assert got == [any(k.top_k == topk and k.num_active_blocks == n for k in under) for n in space.all_block_options]


def test_guard_refuses_a_table_without_every_configuration(space, table):
    partial = LatencyTable(latency_ms={space.full(): 10.0}, knob_space=space.as_dict())
    with pytest.raises(ValueError, match="lacks 53 configurations"):
        BudgetGuard(partial, space)
    with pytest.raises(ValueError, match="quantile=0.9 is not in this latency table"):
        BudgetGuard(table, space, 0.9)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_guarded_decisions_always_fit(space, table, mode):
    config = ControllerConfig(mode=mode, knob_space=space.as_dict(), lang_dim=8, latency_dim=8, budget_range=(0.3, 1.1))
    controller = TwoStageController(config)
    guard = BudgetGuard(table, space)
    n = 400
    budgets = torch.linspace(table.min_ms, table.max_ms, n, dtype=torch.float64)
    lang, token = torch.randn(n, 8), torch.randn(n, 8)
    feat = controller.encode_budget(budgets / table.reference_ms)
    mask = guard.mask(budgets)
    stage2_inputs = {"lang_feat": lang, "budget_feat": feat} if mode == "B" else {"latency_token": token}
    gen = torch.Generator().manual_seed(0)
    for greedy in (False, True):
        tier, pos = controller.sample_stage1(lang, feat, mask, generator=gen, greedy=greedy)
        k, b = controller.sample_stage2(tier, pos, **stage2_inputs, mask=mask, generator=gen, greedy=greedy)
        decisions = Decisions(tier, pos, k, b)
        latency = table.latencies(decisions.to_knobs(space), 0.99)
        assert bool((latency <= budgets.clamp(min=guard.fastest_ms)).all())
        log_prob, _ = controller.evaluate_actions(decisions, lang, feat, mask, stage2_inputs.get("latency_token"))
        unguarded, _ = controller.evaluate_actions(decisions, lang, feat, None, stage2_inputs.get("latency_token"))
        assert torch.isfinite(log_prob).all()
        # Masking renormalises over fewer options: a taken choice never gets less likely.
        assert bool((log_prob >= unguarded - 1e-5).all())
