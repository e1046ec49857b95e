"""The variants beyond Mode B: vision-aware Mode B, the hybrid, distillation.

Inputs, log-probabilities on fixed logits (heads' weights zeroed, biases set) computed by
hand, the budget guard's masks (closed options never sampled, never given probability),
the losses by hand, and the paths that serve and train each variant on the tiny VLM.
"""

import math

import pytest
import torch

from knoblib.controller import KNOB_NAMES, ControllerConfig, Decisions, ModeADecider, TwoStageController
from knoblib.distill import (
    auxiliary_losses,
    check_teacher,
    distill,
    entropy,
    kl_divergence,
    stage1_log_probs,
    stage2_log_probs,
)
from knoblib.grpo import GRPOConfig, JointGRPOTrainer, run_controller
from knoblib.guard import open_mask
from knoblib.knobs import KnobSpace
from knoblib.latency import BudgetSampler

SPACE = KnobSpace.for_model(8, 4)
LANG_DIM, LATENCY_DIM = 12, 20
VISION_DIM = 2 * LANG_DIM
BUDGETS = torch.tensor([0.5, 0.7, 0.9, 1.05])

FIXED = {
    "tier": [0.5, -1.0, 2.0],
    "insertion_position": [1.0, 0.0, -0.5],
    "top_k": [0.3, 0.1, -0.7],
    "num_active_blocks": [1.5, -0.2, 0.4],
}
# The hybrid's Mode-A head, with logits of its own.
FIXED_A = {"top_k": [-0.4, 0.9, 0.2], "num_active_blocks": [0.1, 0.8, -1.1]}


def make_controller(mode="B", **overrides) -> TwoStageController:
    settings = dict(
        mode=mode, knob_space=SPACE.as_dict(), lang_dim=LANG_DIM, latency_dim=LATENCY_DIM, budget_range=(0.4, 1.1),
        num_frequencies=4, hidden_dim=16, budget_dim=8, probe_scale=3.0,
    )
    settings.update(overrides)
    return TwoStageController(ControllerConfig(**settings))


def set_heads(stage1, stage2, logits: dict) -> None:
    """Zero the heads' weights so their logits equal their biases, whatever the input."""
    heads = {
        "tier": stage1.tier_head if stage1 is not None else None,
        "insertion_position": stage1.insertion_head if stage1 is not None else None,
        "top_k": stage2.top_k_head,
        "num_active_blocks": stage2.block_head,
    }
    with torch.no_grad():
        for name, values in logits.items():
            heads[name].weight.zero_()
            heads[name].bias.copy_(torch.tensor(values))


def hand_log_softmax(values, allowed=None):
    allowed = list(range(len(values))) if allowed is None else list(allowed)
    log_norm = math.log(sum(math.exp(values[i]) for i in allowed))
    return [values[i] - log_norm if i in allowed else -math.inf for i in range(len(values))]


def features(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, LANG_DIM, generator=g), torch.randn(n, LATENCY_DIM, generator=g), torch.randn(n, VISION_DIM, generator=g)


# Row 0's budget fits neither the high tier nor, at the medium tier with p = 1, top_k = 4.
def guard_mask(n=3):
    mask = open_mask(SPACE, n)
    mask[0, 2] = False
    mask[0, 1, 0, 2] = False
    return mask


# p index -> allowed all_block_options indices (totals 6, 7, 8; p = 1 all, p = 2 7..8, p = 3 8).
P_BLOCKS = {0: [0, 1, 2], 1: [1, 2], 2: [2]}


def hand_joint(decisions, row, mask, stage2_logits=FIXED):
    """log pi of row's four choices under ``mask`` (T, P, K, NB) of that row, from the fixed logits."""
    t, p, k, b = (int(getattr(decisions, name)[row]) for name in KNOB_NAMES)
    tiers = [i for i in range(3) if bool(mask[i].any())]
    positions = [j for j in range(3) if bool(mask[t, j].any())]
    top_ks = [i for i in range(3) if bool(mask[t, p, i].any())]
    blocks = [i for i in P_BLOCKS[p] if bool(mask[t, p, k, i])]
    return (
        hand_log_softmax(FIXED["tier"], tiers)[t]
        + hand_log_softmax(FIXED["insertion_position"], positions)[p]
        + hand_log_softmax(stage2_logits["top_k"], top_ks)[k]
        + hand_log_softmax(stage2_logits["num_active_blocks"], blocks)[b]
    )


DECISIONS = Decisions(
    tier=torch.tensor([1, 2, 0]),
    insertion_position=torch.tensor([0, 1, 2]),
    top_k=torch.tensor([1, 0, 2]),
    num_active_blocks=torch.tensor([0, 2, 2]),
)


# --- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"mode": "A", "vision_stats": True}, "vision_stats=True needs mode 'B'"),
        ({"mode": "A", "hybrid": True}, "hybrid=True needs mode 'B'"),
        ({"vision_stats": "yes"}, "vision_stats='yes' is invalid"),
        ({"hybrid": 1}, "hybrid=1 is invalid"),
        ({"vision_stats": True, "hybrid": True}, "separate variants"),
        ({"distilled_from": 3}, "distilled_from=3 is invalid"),
    ],
)
def test_controller_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_controller(**overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"mode": "A-resumable", "vision_stats": True}, "vision_stats=True needs mode 'B'"),
        ({"mode": "A-resumable", "hybrid": True}, "hybrid=True needs mode 'B'"),
        ({"vision_stats": True, "hybrid": True}, "separate variants"),
        ({"distill_coef": -0.1}, "distill_coef=-0.1 is invalid"),
        ({"hybrid_grpo_coef": float("nan")}, "hybrid_grpo_coef=nan is invalid"),
        ({"distill_steps": 5}, "need a teacher"),
        ({"distill_from": "x", "hybrid": True}, "distill_from='x' needs mode 'B' without hybrid"),
        ({"distill_from": "x", "mode": "A-resumable"}, "distill_from='x' needs mode 'B'"),
        ({"distill_from": 7}, "distill_from=7 is invalid"),
    ],
)
def test_grpo_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**overrides)


# --- vision-aware Mode B ----------------------------------------------------------------------------
def test_vision_b_log_probs_on_fixed_logits_under_the_guard():
    controller = make_controller(vision_stats=True)
    assert controller.stage2.vision_dim == VISION_DIM
    set_heads(controller.stage1, controller.stage2, FIXED)
    lang, _, vision = features(3)
    mask = guard_mask()
    log_prob, entropies = controller.evaluate_actions(
        DECISIONS, lang, controller.encode_budget(BUDGETS[:3]), mask, vision_feat=vision
    )
    for row in range(3):
        assert log_prob[row].item() == pytest.approx(hand_joint(DECISIONS, row, mask[row]), abs=1e-5)
    # Row 0: only the low and medium tiers fit; the tier's entropy is that of two options.
    two = hand_log_softmax(FIXED["tier"], [0, 1])
    assert entropies["tier"][0].item() == pytest.approx(-sum(math.exp(x) * x for x in two if x > -math.inf), abs=1e-5)


def test_vision_b_needs_its_statistics_of_the_right_shape():
    controller = make_controller(vision_stats=True)
    lang, token, vision = features()
    feat = controller.encode_budget(BUDGETS)
    position = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"pass vision_feat \(4, 24\)"):
        controller.stage2_logits(position, lang, feat)
    with pytest.raises(ValueError, match=r"vision_feat has shape \(4, 23\): expected \(4, 24\)"):
        controller.stage2_logits(position, lang, feat, vision_feat=vision[:, :-1])
    with pytest.raises(ValueError, match=r"expected \(4, 3, 24\)"):
        controller.sample(lang, feat, vision_feat=vision)  # sample() needs every tier's
    with pytest.raises(ValueError, match="no vision input"):
        make_controller().stage2.forward(position + 1, lang_feat=lang, budget_feat=feat, vision_feat=vision)
    with pytest.raises(ValueError, match="latency token"):
        make_controller("A").stage2.forward(position + 1, latency_token=token, vision_feat=vision)
    with pytest.raises(ValueError, match=r"expected \(4, 3, 24\)"):
        controller.joint_log_probs(lang, feat, open_mask(SPACE, 4), vision)


def test_vision_b_masked_options_are_never_sampled():
    controller = make_controller(vision_stats=True)
    # The options the guard closes get the largest raw logits.
    set_heads(controller.stage1, controller.stage2, {"tier": [0.0, 5.0, 10.0], "top_k": [0.0, 5.0, 10.0], "num_active_blocks": [10.0, 5.0, 0.0]})
    n = 3000
    lang = torch.randn(n, LANG_DIM)
    vision = torch.randn(n, 3, VISION_DIM)
    mask = open_mask(SPACE, n)
    mask[:, 2] = False  # no high tier
    mask[:, 1, :, 2] = False  # no top_k = 4 at the medium tier
    mask[:, :, 0, :, 0] = False  # never 6 blocks
    decisions = controller.sample(
        lang, controller.encode_budget(torch.full((n,), 0.8)), mask, generator=torch.Generator().manual_seed(0), vision_feat=vision
    )
    knobs = decisions.to_knobs(SPACE)
    assert all(k.tier != "high" for k in knobs)
    assert all(not (k.tier == "medium" and k.top_k == 4) for k in knobs)
    assert all(not (k.insertion_position == 1 and k.num_active_blocks == 6) for k in knobs)
    assert sum(k.tier == "medium" for k in knobs) > 0.9 * n  # the best open tier wins most draws
    greedy = controller.sample(lang[:50], controller.encode_budget(torch.full((50,), 0.8)), mask[:50], greedy=True, vision_feat=vision[:50])
    assert all(k.tier == "medium" and k.top_k == 3 for k in greedy.to_knobs(SPACE))


def test_vision_b_reads_each_rows_tier():
    controller = make_controller(vision_stats=True)
    with torch.no_grad():
        for p in controller.parameters():
            p.add_(0.5 * torch.randn_like(p))
    lang, _, _ = features(6)
    vision = torch.randn(6, 3, VISION_DIM)
    feat = controller.encode_budget(torch.linspace(0.5, 1.05, 6))
    decisions = controller.sample(lang, feat, greedy=True, vision_feat=vision)
    chosen = vision[torch.arange(6), decisions.tier]
    top_k, blocks = controller.sample_stage2(decisions.tier, decisions.insertion_position, lang, feat, greedy=True, vision_feat=chosen)
    assert torch.equal(top_k, decisions.top_k) and torch.equal(blocks, decisions.num_active_blocks)
    # Other statistics move Stage 2 (the input is read; a constant shift would not: it is layer-normalised).
    moved, _ = controller.stage2_logits(decisions.insertion_position, lang, feat, vision_feat=torch.randn_like(chosen))
    base, _ = controller.stage2_logits(decisions.insertion_position, lang, feat, vision_feat=chosen)
    assert not torch.allclose(moved, base)


def test_vision_b_joint_log_probs_equal_evaluate_actions_for_every_configuration():
    controller = make_controller(vision_stats=True, max_price=2.0)
    with torch.no_grad():
        for p in controller.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lang, _, _ = features(2)
    vision = torch.randn(2, 3, VISION_DIM)
    feat = controller.encode_budget(BUDGETS[:2], torch.tensor([0.0, 1.0]))
    mask = guard_mask(2)
    joint = controller.joint_log_probs(lang, feat, mask, vision)
    torch.testing.assert_close(joint.exp().flatten(1).sum(1), torch.ones(2))
    for knobs in SPACE:
        index = (SPACE.tiers.index(knobs.tier), knobs.insertion_position - 1, SPACE.top_k_options.index(knobs.top_k),
                 SPACE.all_block_options.index(knobs.num_active_blocks))
        rows = [r for r in range(2) if bool(mask[(r, *index)])]  # a closed configuration has no probability
        decisions = Decisions.from_knobs([knobs] * len(rows), SPACE)
        expected, _ = controller.evaluate_actions(decisions, lang[rows], feat[rows], mask[rows], vision_feat=vision[rows, index[0]])
        torch.testing.assert_close(joint[(rows, *index)], expected)
        if len(rows) < 2:
            assert joint[(0, *index)] == -math.inf


def test_vision_b_gradients_reach_the_vision_projection_and_save_load(tmp_path):
    controller = make_controller(vision_stats=True, seed=3)
    lang, _, vision = features()
    decisions = Decisions.from_knobs([SPACE.full(), SPACE.cheapest()] * 2, SPACE)
    log_prob, _ = controller.evaluate_actions(decisions, lang, controller.encode_budget(BUDGETS), vision_feat=vision)
    log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in controller.stage2.vision_proj.parameters())
    controller.save_pretrained(tmp_path)
    loaded = TwoStageController.load(tmp_path, expected_space=SPACE, expected_mode="B")
    assert loaded.config.vision_stats
    again, _ = loaded.evaluate_actions(decisions, lang, loaded.encode_budget(BUDGETS), vision_feat=vision)
    torch.testing.assert_close(again, log_prob.detach())


def test_plain_controllers_keep_their_weights_and_defaults():
    """The new options default off: a plain Mode-B controller is built exactly as before."""
    plain = make_controller()
    assert not plain.config.vision_stats and not plain.config.hybrid and plain.config.distilled_from == ""
    assert not hasattr(plain.stage2, "vision_proj") and not hasattr(plain, "stage2_a")
    assert plain.stage2.fusion[1].in_features == 3 * 16


# --- the hybrid ---------------------------------------------------------------------------------------
def hybrid() -> TwoStageController:
    controller = make_controller(hybrid=True)
    set_heads(controller.stage1, controller.stage2, FIXED)
    set_heads(None, controller.stage2_a, FIXED_A)
    return controller


def test_hybrid_views_share_one_stage1_and_serve_each_head():
    controller = hybrid()
    as_a, as_b = controller.served_as("A"), controller.served_as("B")
    assert (as_a.mode, as_b.mode) == ("A", "B") and (as_a.hybrid_view, as_b.hybrid_view) == ("A", "B")
    assert as_a.stage1 is controller.stage1 is as_b.stage1
    assert as_a.stage2 is controller.stage2_a and as_b.stage2 is controller.stage2
    assert as_a.hybrid_source is controller and not as_a.config.hybrid and controller.config.hybrid
    # A view's parameters are the hybrid's own tensors: training a view trains the hybrid.
    whole = {id(p) for p in controller.parameters()}
    assert {id(p) for p in as_a.parameters()} <= whole and {id(p) for p in as_b.parameters()} <= whole
    with pytest.raises(ValueError, match="not a hybrid"):
        make_controller().served_as("A")
    assert make_controller().served_as("B").mode == "B"
    with pytest.raises(ValueError, match="mode='C'"):
        controller.served_as("C")


def test_is_variant_names_every_variant_and_no_plain_controller():
    """``evaluate --measured`` serves the plain kinds only; the variants' serving is timed by --variants."""
    from knoblib.variants import is_variant

    assert not is_variant(make_controller()) and not is_variant(make_controller("A"))
    assert is_variant(make_controller(vision_stats=True)) and is_variant(make_controller(distilled_from="data/controller_A"))
    assert all(is_variant(view) for view in (hybrid(), hybrid().served_as("A"), hybrid().served_as("B")))


def test_hybrid_log_probs_on_fixed_logits_each_way():
    controller = hybrid()
    lang, token, _ = features(3)
    mask = guard_mask()
    feat = controller.encode_budget(BUDGETS[:3])
    as_b, _ = controller.served_as("B").evaluate_actions(DECISIONS, lang, feat, mask)
    as_a, _ = controller.served_as("A").evaluate_actions(DECISIONS, lang, feat, mask, latency_token=token)
    for row in range(3):
        assert as_b[row].item() == pytest.approx(hand_joint(DECISIONS, row, mask[row]), abs=1e-5)
        assert as_a[row].item() == pytest.approx(hand_joint(DECISIONS, row, mask[row], FIXED_A), abs=1e-5)


def test_hybrid_masked_options_are_never_sampled_in_either_mode():
    controller = make_controller(hybrid=True)
    # The closed totals get the largest raw logits, in both heads.
    set_heads(None, controller.stage2, {"num_active_blocks": [10.0, 5.0, 0.0]})
    set_heads(None, controller.stage2_a, {"num_active_blocks": [10.0, 5.0, 0.0], "top_k": [10.0, 0.0, 0.0]})
    n = 3000
    lang, token = torch.randn(n, LANG_DIM), torch.randn(n, LATENCY_DIM)
    mask = open_mask(SPACE, n)
    mask[:, :, :, 0, :] = False  # never top_k = 2
    mask[:, :, 0, :, 0] = False  # never 6 blocks
    feat = controller.encode_budget(torch.full((n,), 0.8))
    b = controller.served_as("B").sample(lang, feat, mask, generator=torch.Generator().manual_seed(0)).to_knobs(SPACE)
    as_a = controller.served_as("A")
    tier, position = as_a.sample_stage1(lang, feat, mask, generator=torch.Generator().manual_seed(1))
    decider = ModeADecider(as_a, tier, position, mask, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        decider(token, torch.arange(n))
    a = decider.decisions().to_knobs(SPACE)
    for knobs in (a, b):
        assert all(k.top_k != 2 for k in knobs)
        assert all(not (k.insertion_position == 1 and k.num_active_blocks == 6) for k in knobs)
        assert sum(k.num_active_blocks == 7 for k in knobs if k.insertion_position == 1) > 0.9 * sum(
            k.insertion_position == 1 for k in knobs
        )


def test_hybrid_saves_whole_and_each_view_saves_a_plain_controller(tmp_path):
    controller = hybrid()
    controller.save_pretrained(tmp_path / "hybrid")
    loaded = TwoStageController.load(tmp_path / "hybrid", expected_space=SPACE, expected_mode="B")
    assert loaded.config.hybrid
    for (name, x), y in zip(controller.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name
    controller.served_as("A").save_pretrained(tmp_path / "as_a")
    plain_a = TwoStageController.load(tmp_path / "as_a", expected_mode="A")
    assert not plain_a.config.hybrid
    lang, token, _ = features(3)
    feat = controller.encode_budget(BUDGETS[:3])
    expected, _ = controller.served_as("A").evaluate_actions(DECISIONS, lang, feat, latency_token=token)
    got, _ = plain_a.evaluate_actions(DECISIONS, lang, plain_a.encode_budget(BUDGETS[:3]), latency_token=token)
    torch.testing.assert_close(got, expected)


# --- distillation: distributions, KL, teacher checks -------------------------------------------------
def test_stage_log_probs_over_every_option_by_hand():
    controller = make_controller()
    set_heads(controller.stage1, controller.stage2, FIXED)
    lang, _, _ = features(3)
    mask = guard_mask()
    feat = controller.encode_budget(BUDGETS[:3])
    one = stage1_log_probs(controller, lang, feat, mask)  # (3, T, P)
    two = stage2_log_probs(controller, DECISIONS.tier, DECISIONS.insertion_position, lang, feat, mask=mask)  # (3, K, NB)
    for row in range(3):
        m = mask[row]
        tiers = [t for t in range(3) if bool(m[t].any())]
        for t in range(3):
            for p in range(3):
                positions = [j for j in range(3) if bool(m[t, j].any())]
                expected = (
                    hand_log_softmax(FIXED["tier"], tiers)[t] + hand_log_softmax(FIXED["insertion_position"], positions)[p]
                    if t in tiers else -math.inf
                )
                assert one[row, t, p].item() == pytest.approx(expected, abs=1e-5)
        t, p = int(DECISIONS.tier[row]), int(DECISIONS.insertion_position[row])
        top_ks = [k for k in range(3) if bool(m[t, p, k].any())]
        for k in range(3):
            blocks = [b for b in P_BLOCKS[p] if bool(m[t, p, k, b])]
            for b in range(3):
                expected = -math.inf
                if k in top_ks and b in blocks:
                    expected = hand_log_softmax(FIXED["top_k"], top_ks)[k] + hand_log_softmax(FIXED["num_active_blocks"], blocks)[b]
                assert two[row, k, b].item() == pytest.approx(expected, abs=1e-5)
    # Each is a distribution over the open options.
    torch.testing.assert_close(one.exp().flatten(1).sum(1), torch.ones(3))
    torch.testing.assert_close(two.exp().flatten(1).sum(1), torch.ones(3))
    # Row 0 never gives the high tier, nor top_k = 4 at the medium tier with p = 1, any probability.
    assert bool((one[0, 2] == -math.inf).all()) and bool((two[0, 2] == -math.inf).all())


def test_kl_divergence_and_entropy_by_hand():
    inf = -math.inf
    teacher = torch.tensor([[math.log(0.5), math.log(0.5), inf], [math.log(0.2), math.log(0.8), inf]])
    student = torch.tensor([[math.log(0.25), math.log(0.75), inf], [math.log(0.2), math.log(0.8), inf]])
    kl = kl_divergence(teacher, student)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert entropy(teacher)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    # The student closing an option the teacher uses is an infinite divergence; the reverse is not.
    closed = torch.tensor([[0.0, inf, inf]])
    assert kl_divergence(torch.tensor([[math.log(0.5), math.log(0.5), inf]]), closed)[0] == math.inf
    assert kl_divergence(closed, torch.tensor([[math.log(0.5), math.log(0.5), inf]]))[0].item() == pytest.approx(math.log(2))
    # Gradients reach the student only, finite where options are closed.
    student = student.clone().requires_grad_(True)
    kl_divergence(teacher, student).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad[:, 2].eq(0).all()


def test_check_teacher_refuses_what_cannot_teach():
    student = make_controller(max_price=2.0)
    cfg = GRPOConfig(distill_from="t", distill_steps=3, max_price=2.0, average_fraction=0.5)
    with pytest.raises(ValueError, match="pass the loaded teacher"):
        check_teacher(None, student, cfg)
    with pytest.raises(ValueError, match="Mode-A controller"):
        check_teacher(make_controller("B", max_price=2.0), student, cfg)
    with pytest.raises(ValueError, match="max_price=3.0 differs"):
        check_teacher(make_controller("A", max_price=3.0), student, cfg)
    check_teacher(make_controller("A"), student, cfg)  # a teacher without prices teaches per-request budgets only
    with pytest.raises(ValueError, match="does not distil"):
        check_teacher(make_controller("A", max_price=2.0), student, GRPOConfig(max_price=2.0))
    check_teacher(make_controller("A", max_price=2.0), student, cfg)


# --- on the tiny VLM ------------------------------------------------------------------------------------
def make_trainer(vlm, table, pool, teacher=None, **overrides):
    cfg = GRPOConfig(**{"steps": 4, "batch_size": 2, "val_every": 0, "val_size": 4, "seed": 0, **overrides})
    config = ControllerConfig.for_vlm(
        vlm, BudgetSampler(table, margin=cfg.budget_margin).relative_range, mode=cfg.stage2_mode, seed=0,
        max_price=cfg.max_price, vision_stats=cfg.vision_stats, hybrid=cfg.hybrid,
    )
    return JointGRPOTrainer(vlm, TwoStageController(config), table, pool[:16], pool[16:], cfg, teacher=teacher)


def test_rollouts_of_each_variant_read_what_they_need(tiny_vlm, table, pool):
    vision = make_trainer(tiny_vlm, table, pool, vision_stats=True)
    ro = vision.rollout(*vision.next_batch()[:2])
    assert ro.vision_feat.shape == (10, 2 * tiny_vlm.hidden_size) and ro.latency_tokens is None
    plain = make_trainer(tiny_vlm, table, pool)
    ro = plain.rollout(*plain.next_batch()[:2])
    assert ro.vision_feat is None and ro.latency_tokens is None  # plain Mode B reads neither

    hybrid_trainer = make_trainer(tiny_vlm, table, pool, hybrid=True)
    samples, budgets, _ = hybrid_trainer.next_batch()
    ro = hybrid_trainer.rollout(samples, budgets)
    assert ro.latency_tokens.shape == (10, tiny_vlm.hidden_size) and ro.vision_feat is None
    # The rollout's latency tokens are the partial forward's at each row's (tier, p): no extra forward needed.
    rows = [s for s in samples for _ in range(5)]
    probe = hybrid_trainer.controller.probe_embeddings(table.relative(ro.budgets))
    partial = tiny_vlm.partial_forward(
        [s.image() for s in rows], [s.question for s in rows], [(k.tier, k.insertion_position) for k in ro.knobs], probe
    )
    torch.testing.assert_close(ro.latency_tokens, partial, atol=1e-5, rtol=1e-5)


def test_run_controller_vision_statistics_are_those_of_the_chosen_tiers(tiny_vlm, table, pool):
    from knoblib.vision_features import vision_statistics

    trainer = make_trainer(tiny_vlm, table, pool, vision_stats=True)
    rows = pool[:6]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    budgets = torch.linspace(table.min_ms, table.max_ms, 6, dtype=torch.float64)
    run = run_controller(
        tiny_vlm, trainer.controller, trainer.language, images, questions, budgets, table, "B", 2,
        generator=torch.Generator().manual_seed(0), guard=trainer.guard,
    )
    torch.testing.assert_close(run.vision_feat, vision_statistics(tiny_vlm, images, [k.tier for k in run.knobs]))
    # Reused or computed twice, the answers are the same as the configurations' alone.
    again = run_controller(
        tiny_vlm, trainer.controller, trainer.language, images, questions, budgets, table, "B", 2,
        generator=torch.Generator().manual_seed(0), guard=trainer.guard, reuse_vision=False,
    )
    assert again.knobs == run.knobs and again.answers == run.answers
    alone = [tiny_vlm.generate([i], [q], k, 2).answers[0] for i, q, k in zip(images, questions, run.knobs)]
    assert run.answers == alone
    with pytest.raises(ValueError, match="probe_embeddings is for Mode B"):
        run_controller(
            tiny_vlm, make_trainer(tiny_vlm, table, pool, mode="A-resumable").controller, trainer.language, images,
            questions, budgets, table, "A-resumable", 2, probe_embeddings=torch.zeros(6, tiny_vlm.hidden_size),
        )


@pytest.mark.parametrize(
    "overrides",
    [
        {"vision_stats": True},
        {"hybrid": True, "distill_coef": 0.1},
        {"hybrid": True, "hybrid_grpo_coef": 0.0, "distill_coef": 1.0},
        {"vision_stats": True, "max_price": 2.0, "average_fraction": 0.5, "kl_coef": 0.05},
    ],
)
def test_a_grpo_step_of_each_variant(tiny_vlm, table, pool, overrides):
    trainer = make_trainer(tiny_vlm, table, pool, **overrides)
    before = {k: v.clone() for k, v in trainer.controller.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["forwards_per_request"] == 5 and metrics["partial_forwards"] == 0
    assert math.isfinite(metrics["loss"])
    if overrides.get("hybrid"):
        assert {"distill_kl", "a_head_loss", "a_head_clip_fraction", "a_head_entropy"} <= set(metrics)
        # The A head learns (from the KL or the surrogate) although the rollouts were sampled by the B head.
        moved = [k for k, v in trainer.controller.state_dict().items() if k.startswith("stage2_a.") and not torch.equal(v, before[k])]
        assert moved


def test_the_hybrid_a_head_loss_by_hand(tiny_vlm, table, pool):
    """The A head's loss: hybrid_grpo_coef x the clipped surrogate with ratio pi_A / pi_B of the taken
    Stage-2 choice, + distill_coef x KL(B || A) at the rollouts' states, - entropy_coef x its entropy."""
    trainer = make_trainer(tiny_vlm, table, pool, hybrid=True, hybrid_grpo_coef=0.7, distill_coef=0.3, entropy_coef=0.02)
    controller = trainer.controller
    set_heads(None, controller.stage2, {name: FIXED[name] for name in ("top_k", "num_active_blocks")})
    set_heads(None, controller.stage2_a, FIXED_A)
    samples, budgets, _ = trainer.next_batch()
    ro = trainer.rollout(samples, budgets)
    advantages = torch.linspace(-1.0, 1.0, len(ro.reward))
    rows_mask = torch.ones(len(ro.reward), dtype=torch.bool)
    rows_mask[:5] = False  # the first group does not count
    loss_fn = auxiliary_losses(trainer, ro, advantages, rows_mask)
    loss, stats = loss_fn(controller.encode_budget(ro.budget_ratio))
    eps = trainer.cfg.clip_eps
    surrogate, kl, ent = [], [], []
    for row in range(len(ro.reward)):
        t, p, k, b = (int(getattr(ro.decisions, name)[row]) for name in KNOB_NAMES)
        m = ro.mask[row]
        top_ks = [i for i in range(3) if bool(m[t, p, i].any())]

        def joint(logits):
            table_ = {}
            for kk in top_ks:
                blocks = [j for j in P_BLOCKS[p] if bool(m[t, p, kk, j])]
                for bb in blocks:
                    table_[kk, bb] = hand_log_softmax(logits["top_k"], top_ks)[kk] + hand_log_softmax(logits["num_active_blocks"], blocks)[bb]
            return table_

        lb, la = joint(FIXED), joint(FIXED_A)
        rho = math.exp(la[k, b] - lb[k, b])
        a = float(advantages[row])
        if rows_mask[row]:
            surrogate.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
        kl.append(sum(math.exp(lb[o]) * (lb[o] - la[o]) for o in lb))
        ent.append(-sum(math.exp(la[o]) * la[o] for o in la))
    expected = 0.7 * -(sum(surrogate) / len(surrogate)) + 0.3 * sum(kl) / len(kl) - 0.02 * sum(ent) / len(ent)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert stats["distill_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-5)
    assert stats["a_head_entropy"] == pytest.approx(sum(ent) / len(ent), rel=1e-5)


def test_distillation_moves_the_student_to_the_teacher(tiny_vlm, table, pool):
    teacher = make_trainer(tiny_vlm, table, pool, mode="A-resumable").controller
    set_heads(teacher.stage1, teacher.stage2, {"tier": [3.0, 0.0, -1.0], "top_k": [-2.0, 2.5, 0.0], "num_active_blocks": [2.0, 0.0, 1.0]})
    trainer = make_trainer(tiny_vlm, table, pool, teacher=teacher, distill_from="teacher", distill_steps=40, distill_coef=0.2, kl_coef=0.05)
    kl = distill(trainer, 40, batch_size=8)
    assert kl[-1] < 0.5 * kl[0]
    for k, v in trainer.reference.state_dict().items():  # the KL anchor is the distilled policy
        assert torch.equal(v, trainer.controller.state_dict()[k])
    # Alongside GRPO: the teacher's latency tokens come with the rollouts; the teacher never changes.
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["distill_kl"] >= 0 and metrics["forwards_per_request"] == 5
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k])
    with pytest.raises(ValueError, match="before GRPO"):
        distill(trainer, 1)
    # A hybrid distils its B head into its A head, and trains nothing else.
    hybrid_trainer = make_trainer(tiny_vlm, table, pool, hybrid=True, distill_steps=5)
    set_heads(None, hybrid_trainer.controller.stage2, {"top_k": [-2.0, 2.5, 0.0]})
    before = {k: v.clone() for k, v in hybrid_trainer.controller.state_dict().items()}
    kl = distill(hybrid_trainer, 30, batch_size=8)
    assert kl[-1] < kl[0]
    changed = {k.split(".")[0] for k, v in hybrid_trainer.controller.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"stage2_a"}
    with pytest.raises(ValueError, match="no teacher"):
        distill(make_trainer(tiny_vlm, table, pool), 1)


# --- serving and evaluating the variants -----------------------------------------------------------------
def perturbed(vlm, table, **overrides):
    config = ControllerConfig.for_vlm(vlm, BudgetSampler(table).relative_range, mode="B", seed=1, **overrides)
    controller = TwoStageController(config).eval()
    with torch.no_grad():  # untrained heads start near zero; spread them so choices differ
        for p in controller.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return controller


def test_the_batch1_decision_of_the_vision_b_is_the_controllers_own(tiny_vlm, table, samples):
    from knoblib.evaluate import ControllerPolicy
    from knoblib.vision_features import vision_statistics

    controller = perturbed(tiny_vlm, table, vision_stats=True)
    policy = ControllerPolicy(controller, tiny_vlm, table=table)
    assert policy.name == "controller (Mode B + vision)"
    language = policy.language
    space = tiny_vlm.knob_space
    budgets = torch.linspace(table.min_ms, table.max_ms, 5, dtype=torch.float64).tolist()
    for sample in samples[:4]:
        image = sample.image()
        for budget in budgets:
            b = torch.tensor([budget], dtype=torch.float64)
            lang = language([sample.question])
            feat = controller.encode_budget(table.relative(b))
            mask = policy.guard.mask(b)
            tier, pos = controller.sample_stage1(lang, feat, mask, greedy=True)
            vision = vision_statistics(tiny_vlm, [image], [space.tiers[int(tier)]])
            top_k, blocks = controller.sample_stage2(tier, pos, lang, feat, mask=mask, greedy=True, vision_feat=vision)
            expected = Decisions(tier, pos, top_k, blocks).to_knobs(space)[0]
            assert policy.decider.knobs(*policy.decide(sample.question, budget, image=image)) == expected
            answer, knobs = policy.serve_one(tiny_vlm, image, sample.question, budget, 2)
            assert knobs == expected and answer == tiny_vlm.generate([image], [sample.question], knobs, 2).answers[0]
            assert policy.last_decision_ms > 0
    with pytest.raises(ValueError, match="pass image="):
        policy.decide(samples[0].question, budgets[0])
    reused = policy.serve_one(tiny_vlm, samples[0].image(), samples[0].question, budgets[-1], 2)
    policy.reuse_vision = False  # computed twice: the same choice and answer
    assert policy.serve_one(tiny_vlm, samples[0].image(), samples[0].question, budgets[-1], 2) == reused


def test_evaluation_names_each_kind_and_serves_the_hybrid_both_ways(tiny_vlm, table, samples, tmp_path):
    from knoblib.evaluate import ControllerPolicy
    from knoblib.plane import controller_choices
    from knoblib.variants import controller_name, load_controllers

    hybrid_controller = perturbed(tiny_vlm, table, hybrid=True)
    hybrid_controller.save_pretrained(tmp_path / "hybrid")
    perturbed(tiny_vlm, table, vision_stats=True).save_pretrained(tmp_path / "vision")
    perturbed(tiny_vlm, table, distilled_from="data/controller_A").save_pretrained(tmp_path / "distilled")
    named = load_controllers([tmp_path / "hybrid", tmp_path / "vision", tmp_path / "distilled"], tiny_vlm.knob_space)
    assert list(named) == [
        "controller (hybrid as A)", "controller (hybrid as B)", "controller (Mode B + vision)", "controller (Mode B, distilled)"
    ]
    assert controller_name(perturbed(tiny_vlm, table, use_question=False)) == "budget-only controller (Mode B)"
    rows = samples[:4]
    budgets = torch.full((4,), 0.5 * (table.min_ms + table.max_ms), dtype=torch.float64)
    for name, controller in named.items():
        policy = ControllerPolicy(controller, tiny_vlm, table=table)
        assert policy.name == name
        knobs = controller_choices(tiny_vlm, controller, rows, table, budgets)
        # The plane's batched greedy choices are what serving one request at a time chooses.
        served = [policy.serve_one(tiny_vlm, s.image(), s.question, float(budgets[0]), 2)[1] for s in rows]
        assert knobs == served, name


def test_the_variants_table_and_its_verdict():
    from knoblib.variants import format_variants, variants_table

    points = []
    accuracy = {"controller (Mode A)": [0.80, 0.90], "controller (Mode B)": [0.78, 0.89], "controller (hybrid as A)": [0.80, 0.895]}
    for name, values in accuracy.items():
        for x, a in zip((20.0, 30.0), values):
            points.append({"policy": name, "kind": "budget", "x": x, "accuracy": a, "mean_latency_ms": x - 2, "violation_rate": 0.0})
    points.append({"policy": "controller (Mode A)", "kind": "target", "x": 25.0, "accuracy": 0.7, "mean_latency_ms": 25.0, "violation_rate": 0.0})
    steps = {"controller (Mode A)": {"median_s": 0.3}, "controller (Mode B)": {"median_s": 0.2}, "controller (hybrid as A)": {"median_s": 0.22}}
    serving = {"controller (hybrid as A)": {"median_overhead_ms": 1.5, "median_decision_ms": 0.4}}
    rows = variants_table({"points": points}, steps, serving, list(accuracy))
    by = {r["policy"]: r for r in rows}
    assert by["controller (Mode A)"]["mean_accuracy"] == pytest.approx(0.85)
    assert by["controller (Mode A)"]["target_mean_accuracy"] == pytest.approx(0.7)
    assert by["controller (Mode B)"]["reaches_mode_a_at_mode_b_cost"] is False  # 1.5 points below Mode A
    assert by["controller (hybrid as A)"]["step_time_over_mode_b"] == pytest.approx(1.1)
    assert by["controller (hybrid as A)"]["reaches_mode_a_at_mode_b_cost"] is True  # 0.25 points below, 1.1x the cost
    assert by["controller (Mode A)"]["reaches_mode_a_at_mode_b_cost"] is False  # 1.5x Mode B's cost
    text = format_variants(rows)
    assert "controller (hybrid as A)" in text and "0.850" in text


def test_the_command_line_sets_each_option():
    from knoblib.__main__ import build_parser
    from knoblib.training import with_options

    args = build_parser().parse_args(
        ["train", "--mode", "B", "--distill-from", "data/controller_A", "--distill-steps", "200", "--distill-coef", "0.1"]
    )
    cfg = with_options(GRPOConfig(mode="B"), args)
    assert (cfg.distill_from, cfg.distill_steps, cfg.distill_coef) == ("data/controller_A", 200, 0.1)
    cfg = with_options(GRPOConfig(mode="B"), build_parser().parse_args(["train", "--hybrid", "--hybrid-grpo-coef", "0.5"]))
    assert cfg.hybrid and cfg.hybrid_grpo_coef == 0.5 and not cfg.vision_stats
    cfg = with_options(GRPOConfig(mode="B"), build_parser().parse_args(["train", "--vision-stats"]))
    assert cfg.vision_stats and not cfg.hybrid
    with pytest.raises(ValueError, match="need a teacher"):
        with_options(GRPOConfig(mode="B"), build_parser().parse_args(["train", "--distill-steps", "5"]))
    args = build_parser().parse_args(["evaluate", "--variants", "--timing-steps", "0", "--serving-requests", "3"])
    assert args.variants and args.timing_steps == 0 and args.serving_requests == 3


def test_a_teacher_without_prices_is_distilled_on_per_request_budgets_only(tiny_vlm, table, pool):
    teacher = make_trainer(tiny_vlm, table, pool, mode="A-resumable").controller  # max_price 0
    set_heads(teacher.stage1, teacher.stage2, {"tier": [3.0, 0.0, -1.0], "top_k": [-2.0, 2.5, 0.0]})
    trainer = make_trainer(
        tiny_vlm, table, pool, teacher=teacher, distill_from="teacher", distill_coef=1.0, max_price=2.0,
        average_fraction=0.5, batch_size=8,
    )
    samples, budgets, prices = trainer.next_batch()
    assert bool((prices > 0).any()) and bool((prices == 0).any())
    ro = trainer.rollout(samples, budgets, prices=prices)
    n = len(ro.reward)
    loss_fn = auxiliary_losses(trainer, ro, torch.zeros(n), torch.ones(n, dtype=torch.bool))
    feat = trainer.controller.encode_budget(ro.budget_ratio, ro.prices)
    _, stats = loss_fn(feat)
    with torch.no_grad():
        t_feat = teacher.encode_budget(ro.budget_ratio)
        d = ro.decisions
        kl = kl_divergence(
            stage2_log_probs(teacher, d.tier, d.insertion_position, latency_token=ro.latency_tokens, mask=ro.mask),
            stage2_log_probs(trainer.controller, d.tier, d.insertion_position, ro.lang_feat, feat, mask=ro.mask),
        ) + kl_divergence(stage1_log_probs(teacher, ro.lang_feat, t_feat, ro.mask), stage1_log_probs(trainer.controller, ro.lang_feat, feat, ro.mask))
    rows = ro.prices == 0
    assert stats["distill_kl"] == pytest.approx(float(kl[rows].mean()), rel=1e-5)
    assert abs(float(kl.mean()) - stats["distill_kl"]) > 1e-6  # the priced rows are left out
    assert distill(trainer, 3, batch_size=8)[-1] >= 0
