"""The budget guard: masks equal brute force over the knob space; guarded choices always fit."""

import pytest
import torch

from knoblib.controller import ControllerConfig, TwoStageController
from knoblib.guard import BudgetGuard
from knoblib.knobs import KnobSpace
from knoblib.latency import LatencyTable


@pytest.fixture(scope="module")
def space():
    return KnobSpace.for_model(8, 4)


@pytest.fixture(scope="module")
def table(space):
    cost = {"low": 10.0, "medium": 20.0, "high": 35.0}
    latency = {k: cost[k.tier] + 4.0 * k.num_active_blocks + 2.0 * k.top_k * (8 - k.insertion_position) for k in space}
    return LatencyTable(latency_ms=latency, knob_space=space.as_dict())


def test_masks_match_brute_force(space, table):
    guard = BudgetGuard(table, space)
    budgets = torch.tensor([table.min_ms, 60.0, 75.0, table.max_ms, 1.0])
    fits = [[k for k in space if table.latency(k) <= max(b, table.min_ms)] for b in budgets.tolist()]
    tier_mask = guard.tier_mask(budgets)
    for row, feasible in enumerate(fits):
        assert tier_mask[row].tolist() == [any(k.tier == t for k in feasible) for t in space.tiers]
        for t_idx, tier in enumerate(space.tiers):
            pos = guard.position_mask(budgets[row : row + 1], torch.tensor([t_idx]))[0]
            expected = [any(k.tier == tier and k.insertion_position == p for k in feasible) for p in space.insertion_positions]
            assert pos.tolist() == expected
    # Nothing fits a 1 ms budget: only the fastest configuration stays open.
    fastest = table.fastest()
    assert tier_mask[4].tolist() == [t == fastest.tier for t in space.tiers]


def test_guarded_decisions_always_fit(space, table):
    config = ControllerConfig(knob_space=space.as_dict(), lang_dim=8, latency_dim=8, budget_range_ms=(table.min_ms, table.max_ms))
    controller = TwoStageController(config)
    guard = BudgetGuard(table, space)
    n = 400
    budgets = torch.linspace(table.min_ms, table.max_ms, n, dtype=torch.float64)
    lang = torch.randn(n, 8)
    feat = controller.encode_budget(budgets)
    gen = torch.Generator().manual_seed(0)
    for greedy in (False, True):
        tier, pos = controller.sample_stage1(lang, feat, generator=gen, greedy=greedy, guard=guard, budgets_ms=budgets)
        k, b = controller.sample_stage2(
            pos, lang_feat=lang, budget_feat=feat, generator=gen, greedy=greedy, guard=guard, budgets_ms=budgets, tier_idx=tier
        )
        from knoblib.controller import Decisions

        decisions = Decisions(tier, pos, k, b)
        latency = table.latencies(decisions.to_knobs(space))
        assert bool((latency <= budgets).all())
        log_prob, _ = controller.evaluate_actions(decisions, lang, feat, guard=guard, budgets_ms=budgets)
        unguarded, _ = controller.evaluate_actions(decisions, lang, feat)
        assert torch.isfinite(log_prob).all()
        # Masking renormalises over fewer options: a taken choice never gets less likely.
        assert bool((log_prob >= unguarded - 1e-5).all())
