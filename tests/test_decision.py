"""The batch-1 greedy decider makes the controller's own greedy choices, from the same logits."""

import pytest
import torch

from knoblib.controller import ControllerConfig, Decisions, TwoStageController
from knoblib.decision import GreedyDecider
from knoblib.features import BudgetOutOfRangeWarning, LanguageFeatureExtractor
from knoblib.guard import BudgetGuard
from knoblib.latency import LatencyTable


def work(k) -> float:
    tier = {"low": 20.0, "medium": 26.0, "high": 32.0}[k.tier]
    return tier + 3.0 * k.num_active_blocks + 1.5 * (k.top_k * (8 - k.insertion_position) + 4 * k.insertion_position) / 8


@pytest.fixture(scope="module")
def table(tiny_vlm):
    space = tiny_vlm.knob_space
    return LatencyTable(
        latency_ms={k: work(k) for k in space}, knob_space=space.as_dict(), quantile_factors={0.5: 1.0, 0.95: 1.1, 0.99: 1.15}
    )


def controller_for(vlm, mode, act, seed=0):
    config = ControllerConfig.for_vlm(vlm, (0.55, 1.1), mode=mode, seed=seed, hidden_act=act)
    controller = TwoStageController(config).eval()
    # Untrained heads start near zero (near-uniform policies); spread them so choices differ.
    with torch.no_grad():
        for p in controller.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return controller


def tensor_path(controller, language, table, guard, question, budget, token):
    """The batched, general path: sample_stage1 / sample_stage2 with greedy=True under the guard's mask."""
    lang = language([question])
    feat = controller.encode_budget(torch.tensor([budget / table.reference_ms]))
    mask = guard.mask(torch.tensor([budget]))
    tier, pos = controller.sample_stage1(lang, feat, mask, greedy=True)
    inputs = {"lang_feat": lang, "budget_feat": feat} if controller.mode == "B" else {"latency_token": token}
    top_k, blocks = controller.sample_stage2(tier, pos, **inputs, mask=mask, greedy=True)
    return Decisions(tier, pos, top_k, blocks).to_knobs(controller.knob_space)[0]


def fast_path(decider, question, budget, token):
    with torch.inference_mode():
        fitting = decider.fitting(budget)
        shared = decider.features(question, budget)
        tier, position = decider.stage1(shared, fitting)
        rest = decider.stage2(tier, position, fitting, shared, token)
    return decider.knobs(tier, position, *rest)


@pytest.mark.parametrize("mode", ["A", "B"])
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
def test_same_choices_as_the_controller(tiny_vlm, samples, table, mode, act):
    controller = controller_for(tiny_vlm, mode, act)
    language = LanguageFeatureExtractor.from_vlm(tiny_vlm)
    guard = BudgetGuard(table, tiny_vlm.knob_space)
    decider = GreedyDecider(controller, language, table.reference_ms, guard)
    generator = torch.Generator().manual_seed(1)
    budgets = torch.linspace(0.9 * table.min_ms, 1.3 * table.max_ms, 17).tolist()
    chosen = set()
    for s in samples:
        token = torch.randn(1, tiny_vlm.hidden_size, generator=generator)
        for budget in budgets:
            expected = tensor_path(controller, language, table, guard, s.question, budget, token)
            assert fast_path(decider, s.question, budget, token) == expected
            chosen.add(expected)
    assert len(chosen) > 5  # the comparison covered many different configurations


def test_the_fold_follows_the_weights(tiny_vlm, samples, table):
    """Training after the decider was built: the folded matrices are recomputed, never stale."""
    controller = controller_for(tiny_vlm, "B", "gelu_tanh")
    language = LanguageFeatureExtractor.from_vlm(tiny_vlm)
    guard = BudgetGuard(table, tiny_vlm.knob_space)
    decider = GreedyDecider(controller, language, table.reference_ms, guard)
    budget = table.max_ms
    fast_path(decider, samples[0].question, budget, None)  # builds the fold
    with torch.no_grad():
        controller.stage1.tier_head.bias.copy_(torch.tensor([10.0, -10.0, -10.0]))  # now the low tier wins
    after = fast_path(decider, samples[0].question, budget, None)
    assert after.tier == "low" and after == tensor_path(controller, language, table, guard, samples[0].question, budget, None)


def test_budgets_past_the_range_get_the_choice_of_its_edge(tiny_vlm, samples, table):
    controller = controller_for(tiny_vlm, "B", "gelu_tanh")
    decider = GreedyDecider(controller, LanguageFeatureExtractor.from_vlm(tiny_vlm), table.reference_ms, BudgetGuard(table, tiny_vlm.knob_space))
    with pytest.warns(BudgetOutOfRangeWarning):  # once, at the first budget past the range
        for s in samples:
            edge = decider.decide(s.question, 2 * table.reference_ms)
            assert decider.decide(s.question, 10 * table.reference_ms) == edge
            assert decider.decide(s.question, 1000 * table.reference_ms) == edge


def test_without_a_guard_every_configuration_is_open(tiny_vlm, table):
    controller = controller_for(tiny_vlm, "B", "gelu_tanh")
    decider = GreedyDecider(controller, LanguageFeatureExtractor.from_vlm(tiny_vlm), table.reference_ms, None)
    assert len(decider.fitting(1.0)) == len(tiny_vlm.knob_space)
    assert decider.decide("what color is the shape ?", 1.0) in set(tiny_vlm.knob_space)
