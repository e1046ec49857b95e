"""Tests for knoblib.controller: distributions, masking, sampling, saving and loading."""

import math
from types import SimpleNamespace

import pytest
import torch

from knoblib.controller import (
    KNOB_NAMES,
    ControllerConfig,
    Decisions,
    Knob2Knob3Predictor,
    ModeADecider,
    TwoStageController,
)
from knoblib.knobs import KnobConfig, KnobSpace

# 8 blocks, top-4: p in 1..3, top_k in (2, 3, 4); totals p=1: 6..8, p=2: 7..8, p=3: 8.
SPACE = KnobSpace.for_model(8, 4)
LANG_DIM, LATENCY_DIM = 12, 20
BUDGETS = torch.tensor([0.5, 0.7, 0.9, 1.05])  # relative to the full configuration's latency


def make_controller(mode: str = "B", space: KnobSpace = SPACE, **overrides) -> TwoStageController:
    settings = dict(
        mode=mode,
        knob_space=space.as_dict(),
        lang_dim=LANG_DIM,
        latency_dim=LATENCY_DIM,
        budget_range=(0.4, 1.1),
        num_frequencies=4,
        hidden_dim=16,
        budget_dim=8,
        probe_scale=3.0,
    )
    settings.update(overrides)
    return TwoStageController(ControllerConfig(**settings))


def features(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, LANG_DIM, generator=g), torch.randn(n, LATENCY_DIM, generator=g)


def set_fixed_logits(controller: TwoStageController, logits: dict[str, list[float]]) -> None:
    """Zero every head's weights so its logits equal its bias, whatever the input."""
    heads = {
        "tier": controller.stage1.tier_head,
        "insertion_position": controller.stage1.insertion_head,
        "top_k": controller.stage2.top_k_head,
        "num_active_blocks": controller.stage2.block_head,
    }
    with torch.no_grad():
        for name, values in logits.items():
            heads[name].weight.zero_()
            heads[name].bias.copy_(torch.tensor(values))


def hand_log_softmax(values: list[float], allowed: list[int] | None = None) -> list[float]:
    allowed = list(range(len(values))) if allowed is None else allowed
    log_norm = math.log(sum(math.exp(values[i]) for i in allowed))
    return [values[i] - log_norm if i in allowed else -math.inf for i in range(len(values))]


def hand_entropy(log_probs: list[float]) -> float:
    return -sum(math.exp(lp) * lp for lp in log_probs if lp > -math.inf)


# --- probabilities ----------------------------------------------------------------------
FIXED = {
    "tier": [0.5, -1.0, 2.0],
    "insertion_position": [1.0, 0.0, -0.5],
    "top_k": [0.3, 0.1, -0.7],
    "num_active_blocks": [1.5, -0.2, 0.4],
}


@pytest.mark.parametrize("mode", ["A", "B"])
def test_log_probs_and_entropies_match_hand_computation(mode):
    controller = make_controller(mode)
    set_fixed_logits(controller, FIXED)
    lang_feat, latency_token = features(3)
    budget_feat = controller.encode_budget(BUDGETS[:3])
    decisions = Decisions(
        tier=torch.tensor([0, 2, 1]),
        insertion_position=torch.tensor([0, 1, 2]),  # p = 1, 2, 3
        top_k=torch.tensor([2, 0, 1]),
        num_active_blocks=torch.tensor([0, 1, 2]),  # totals 6, 7, 8: each allowed for its p
    )
    log_prob, entropies = controller.evaluate_actions(decisions, lang_feat, budget_feat, latency_token=latency_token)

    allowed_blocks = {0: [0, 1, 2], 1: [1, 2], 2: [2]}  # per p index: allowed all_block_options indices
    for row in range(3):
        p_idx = decisions.insertion_position[row].item()
        per_knob = {
            "tier": hand_log_softmax(FIXED["tier"]),
            "insertion_position": hand_log_softmax(FIXED["insertion_position"]),
            "top_k": hand_log_softmax(FIXED["top_k"]),
            "num_active_blocks": hand_log_softmax(FIXED["num_active_blocks"], allowed_blocks[p_idx]),
        }
        expected = sum(per_knob[name][getattr(decisions, name)[row].item()] for name in KNOB_NAMES)
        assert log_prob[row].item() == pytest.approx(expected, abs=1e-5)
        for name in KNOB_NAMES:
            assert entropies[name][row].item() == pytest.approx(hand_entropy(per_knob[name]), abs=1e-5)
    # p = 3 allows one total only: no uncertainty left.
    assert entropies["num_active_blocks"][2].item() == pytest.approx(0.0, abs=1e-6)


def test_masked_block_options_are_never_sampled_nor_chosen_greedily():
    controller = make_controller("B")
    # The disallowed totals get the largest raw logits.
    set_fixed_logits(controller, {"num_active_blocks": [10.0, 5.0, 0.0]})
    n = 5000
    lang_feat = torch.randn(n, LANG_DIM)
    budget_feat = controller.encode_budget(torch.full((n,), 0.8))
    position = torch.arange(n) % 3  # p = 1, 2, 3
    generator = torch.Generator().manual_seed(0)
    tier = torch.zeros(n, dtype=torch.long)
    _, blocks = controller.sample_stage2(tier, position, lang_feat, budget_feat, generator=generator)
    totals = torch.tensor(SPACE.all_block_options)[blocks]
    for p_idx in range(3):
        allowed = set(SPACE.block_options(p_idx + 1))
        assert set(totals[position == p_idx].tolist()) <= allowed
    # p = 1 allows all three; the largest logit wins there almost always.
    assert (totals[position == 0] == 6).float().mean() > 0.9

    _, greedy = controller.sample_stage2(tier, position, lang_feat, budget_feat, greedy=True)
    greedy_totals = torch.tensor(SPACE.all_block_options)[greedy]
    assert greedy_totals[position == 0].eq(6).all()
    assert greedy_totals[position == 1].eq(7).all()
    assert greedy_totals[position == 2].eq(8).all()


def test_knob3_mask_and_options():
    controller = make_controller("B")
    assert controller.stage2.get_knob3_options(2) == (7, 8)
    mask = controller.stage2.knob3_mask(torch.tensor([1, 2, 3]))
    assert mask.tolist() == [[True, True, True], [False, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="insertion_position"):
        controller.stage2.knob3_mask(torch.tensor([0, 4]))


def test_knob2knob3_predictor_on_its_own():
    sizes = dict(lang_dim=4, budget_dim=4, latency_dim=6, hidden_dim=8, max_insertion_position=2, top_k_options=(1, 2))
    predictor = Knob2Knob3Predictor(False, block_options={1: (3, 4), 2: (4,)}, **sizes)
    assert predictor.mode == "A" and predictor.all_block_options == (3, 4)
    top_k, blocks = predictor(torch.tensor([1, 2]), latency_token=torch.randn(2, 6))
    assert top_k.shape == (2, 2) and blocks.shape == (2, 2)
    assert blocks[1, 0] == -math.inf and torch.isfinite(blocks[0]).all()
    with pytest.raises(ValueError, match="block_options has keys"):
        Knob2Knob3Predictor(True, block_options={1: (3, 4)}, **sizes)


# --- input validation ------------------------------------------------------------------------
def test_mode_b_needs_language_and_budget():
    controller = make_controller("B")
    lang_feat, latency_token = features()
    budget_feat = controller.encode_budget(BUDGETS)
    position = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="Mode B.*budget_feat"):
        controller.stage2_distributions(position, lang_feat=lang_feat)
    with pytest.raises(ValueError, match="Mode B.*latency_token"):
        controller.stage2(position + 1, lang_feat=lang_feat, budget_feat=budget_feat, latency_token=latency_token)


def test_mode_a_needs_the_latency_token():
    controller = make_controller("A")
    lang_feat, latency_token = features()
    budget_feat = controller.encode_budget(BUDGETS)
    position = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="Mode A.*latency_token"):
        controller.stage2_distributions(position, lang_feat, budget_feat)
    with pytest.raises(ValueError, match="Mode A"):
        controller.stage2(position + 1, lang_feat=lang_feat, latency_token=latency_token)
    with pytest.raises(ValueError, match="Mode B"):
        controller.sample(lang_feat, budget_feat)
    # Mode A's Stage 2 reads only the latency token.
    top_k, blocks = controller.stage2_distributions(position, latency_token=latency_token)
    assert top_k.logits.shape == (4, 3) and blocks.logits.shape == (4, 3)


@pytest.mark.parametrize(
    "which, shape, match",
    [
        ("lang", (4, LANG_DIM + 1), r"lang_feat has shape \(4, 13\): expected \(4, 12\)"),
        ("lang", (LANG_DIM,), r"lang_feat has shape \(12,\)"),
        ("budget", (3, 8), r"budget_feat has shape \(3, 8\): expected \(4, 8\)"),
        ("latency", (4, LATENCY_DIM - 1), r"latency_token has shape \(4, 19\): expected \(4, 20\)"),
    ],
)
def test_wrong_feature_shapes_raise(which, shape, match):
    controller = make_controller("A" if which == "latency" else "B")
    lang_feat, latency_token = features()
    budget_feat = controller.encode_budget(BUDGETS)
    bad = torch.zeros(shape)
    kwargs = {"lang_feat": lang_feat, "budget_feat": budget_feat, "latency_token": latency_token}
    kwargs[{"lang": "lang_feat", "budget": "budget_feat", "latency": "latency_token"}[which]] = bad
    decisions = Decisions.from_knobs([SPACE.full()] * 4, SPACE)
    with pytest.raises(ValueError, match=match):
        controller.evaluate_actions(decisions, **kwargs)


def test_position_indices_are_checked():
    controller = make_controller("B")
    lang_feat, _ = features()
    with pytest.raises(ValueError, match="insertion_position_idx"):
        controller.stage2_distributions(torch.tensor([0, 1, 2, 3]), lang_feat, controller.encode_budget(BUDGETS))


def test_infeasible_decisions_are_rejected():
    controller = make_controller("B")
    lang_feat, _ = features(1)
    bad = Decisions(torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([0]))  # p=3 with 6 blocks
    with pytest.raises(ValueError, match="num_active_blocks=6 is not allowed for insertion_position=3"):
        controller.evaluate_actions(bad, lang_feat, controller.encode_budget(BUDGETS[:1]))
    with pytest.raises(ValueError, match="not allowed"):
        bad.to_knobs(SPACE)


# --- decisions -----------------------------------------------------------------------------------
def test_decisions_round_trip_through_knobs():
    knobs = list(SPACE)
    decisions = Decisions.from_knobs(knobs, SPACE)
    assert len(decisions) == len(knobs)
    assert decisions.to_knobs(SPACE) == knobs
    assert decisions.index([0, 5]).to_knobs(SPACE) == [knobs[0], knobs[5]]
    with pytest.raises(ValueError, match="top_k"):
        Decisions.from_knobs([KnobConfig("low", 1, 8, 8)], SPACE)


def test_decisions_validate_their_tensors():
    with pytest.raises(ValueError, match="LongTensor"):
        Decisions(torch.tensor([0.0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows"):
        Decisions(torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]))


# --- sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    controller = make_controller("B")
    lang_feat, _ = features(64)
    budget_feat = controller.encode_budget(torch.linspace(0.4, 1.1, 64))
    state = torch.get_rng_state()
    first = controller.sample(lang_feat, budget_feat, generator=torch.Generator().manual_seed(7))
    second = controller.sample(lang_feat, budget_feat, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    for name in KNOB_NAMES:
        assert torch.equal(getattr(first, name), getattr(second, name))
    other = controller.sample(lang_feat, budget_feat, generator=torch.Generator().manual_seed(8))
    assert any(not torch.equal(getattr(first, name), getattr(other, name)) for name in KNOB_NAMES)
    first.to_knobs(SPACE)  # every sampled row is a valid configuration


def test_same_seed_same_weights():
    a, b = make_controller("B", seed=5), make_controller("B", seed=5)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    c = make_controller("B", seed=6)
    assert not torch.equal(a.stage1.trunk[0].weight, c.stage1.trunk[0].weight)


# --- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["A", "B"])
def test_gradients_reach_both_stages_and_the_budget_encoder(mode):
    controller = make_controller(mode)
    lang_feat, latency_token = features()
    budget_feat = controller.encode_budget(BUDGETS)
    decisions = Decisions.from_knobs([SPACE.full(), SPACE.cheapest(), SPACE.full(), SPACE.cheapest()], SPACE)
    log_prob, entropies = controller.evaluate_actions(decisions, lang_feat, budget_feat, latency_token=latency_token)
    assert log_prob.shape == (4,)
    (log_prob.sum() + 0.1 * sum(e.sum() for e in entropies.values())).backward()
    for module in (controller.stage1, controller.stage2, controller.budget_encoder):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_latency_tokens_made_under_inference_mode_can_be_scored():
    controller = make_controller("A")
    lang_feat, _ = features()
    with torch.inference_mode():  # as KnobVLM.generate returns them
        latency_token = torch.randn(4, LATENCY_DIM)
    decisions = Decisions.from_knobs([SPACE.full()] * 4, SPACE)
    log_prob, _ = controller.evaluate_actions(
        decisions, lang_feat, controller.encode_budget(BUDGETS), latency_token=latency_token
    )
    log_prob.sum().backward()
    assert controller.stage2.latency_token_proj.weight.grad is not None


def test_mode_a_decider_records_what_it_chose():
    controller = make_controller("A")
    lang_feat, latency_token = features()
    budget_feat = controller.encode_budget(BUDGETS)
    tier, position = controller.sample_stage1(lang_feat, budget_feat, generator=torch.Generator().manual_seed(0))
    decider = ModeADecider(controller, tier, position, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # the VLM calls it per pause, rows in any order
        top_k, blocks = decider(latency_token[[2, 0]], torch.tensor([2, 0]))
        with pytest.raises(ValueError, match="never reached"):
            decider.decisions()
        decider(latency_token[[1, 3]], torch.tensor([1, 3]))
    decisions = decider.decisions()
    knobs = decisions.to_knobs(SPACE)
    assert [knobs[2].top_k, knobs[0].top_k] == top_k
    assert [knobs[2].num_active_blocks, knobs[0].num_active_blocks] == blocks
    torch.testing.assert_close(decider.latency_tokens, latency_token)
    log_prob, _ = controller.evaluate_actions(decisions, lang_feat, budget_feat, latency_token=decider.latency_tokens)
    assert torch.isfinite(log_prob).all()


def test_probe_embeddings():
    controller = make_controller("A")
    probe = controller.probe_embeddings(BUDGETS)
    assert probe.shape == (4, LATENCY_DIM) and not probe.requires_grad
    torch.testing.assert_close(probe.norm(dim=-1), torch.full((4,), 3.0))


# --- saving and loading -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["A", "B"])
def test_save_load_round_trip(tmp_path, mode):
    controller = make_controller(mode, seed=3)
    controller.save_pretrained(tmp_path)
    loaded = TwoStageController.from_pretrained(tmp_path)
    assert loaded.config.mode == mode and loaded.knob_space == SPACE
    for (name, x), y in zip(controller.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name

    lang_feat, latency_token = features()
    decisions = Decisions.from_knobs([SPACE.full(), SPACE.cheapest()] * 2, SPACE)
    expected, _ = controller.evaluate_actions(
        decisions, lang_feat, controller.encode_budget(BUDGETS), latency_token=latency_token
    )
    got, _ = loaded.evaluate_actions(decisions, lang_feat, loaded.encode_budget(BUDGETS), latency_token=latency_token)
    assert torch.equal(expected, got)
    assert torch.equal(controller.probe_embeddings(BUDGETS), loaded.probe_embeddings(BUDGETS))

    checked = TwoStageController.load(
        tmp_path, expected_space=SPACE, expected_mode=mode, expected_latency_dim=LATENCY_DIM
    )
    assert torch.equal(checked.stage1.tier_head.weight, controller.stage1.tier_head.weight)


@pytest.mark.parametrize(
    "expected, match",
    [
        ({"expected_space": KnobSpace.for_model(16, 8)}, "checkpoint from another configuration.*knob_space"),
        ({"expected_mode": "A"}, "checkpoint from another configuration.*mode 'B' != expected 'A'"),
        ({"expected_latency_dim": 64}, "latency_dim 20 != expected 64"),
    ],
)
def test_load_rejects_another_configuration(tmp_path, expected, match):
    make_controller("B").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        TwoStageController.load(tmp_path, **expected)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        TwoStageController.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        TwoStageController.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TwoStageController.load(tmp_path)  # exists but empty


# --- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "C"),
        ("lang_dim", 0),
        ("latency_dim", -3),
        ("hidden_dim", 2.5),
        ("budget_range", (3.0, 1.0)),
        ("hidden_act", "tanh"),
        ("num_frequencies", 0),
        ("probe_scale", 0.0),
        ("seed", -1),
        ("knob_space", {"num_layers": 8}),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ControllerConfig(**{field: value})


def test_config_for_vlm():
    embedding = torch.nn.Embedding(10, LATENCY_DIM)
    vlm = SimpleNamespace(knob_space=SPACE, hidden_size=LATENCY_DIM, input_embeddings=embedding, tokenizer=None)
    config = ControllerConfig.for_vlm(vlm, (0.4, 1.1), mode="A")
    assert config.get_knob_space() == SPACE and config.mode == "A"
    assert config.lang_dim == config.latency_dim == LATENCY_DIM
    assert config.probe_scale == pytest.approx(embedding.weight.norm(dim=-1).mean().item())


# --- with a real (tiny) VLM ---------------------------------------------------------------------------
def test_resumable_mode_a_with_the_tiny_vlm(tiny_vlm, samples):
    from knoblib.features import LanguageFeatureExtractor

    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.4, 1.1), mode="A", hidden_dim=16))
    rows = samples[:3]
    lang_feat = LanguageFeatureExtractor.from_vlm(tiny_vlm)([s.question for s in rows])
    budgets = torch.tensor([0.5, 0.8, 1.05])
    budget_feat = controller.encode_budget(budgets)
    tier, position = controller.sample_stage1(lang_feat, budget_feat, generator=torch.Generator().manual_seed(0))
    space = controller.knob_space
    decider = ModeADecider(controller, tier, position, generator=torch.Generator().manual_seed(1))
    out = tiny_vlm.generate(
        [s.image() for s in rows],
        [s.question for s in rows],
        max_new_tokens=2,
        probe_embeddings=controller.probe_embeddings(budgets),
        decide=decider,
        stage1=[(space.tiers[t], space.insertion_positions[p]) for t, p in zip(tier.tolist(), position.tolist())],
    )
    decisions = decider.decisions()
    assert out.knobs == decisions.to_knobs(space)
    torch.testing.assert_close(decider.latency_tokens, out.latency_tokens.clone())
    log_prob, _ = controller.evaluate_actions(decisions, lang_feat, budget_feat, latency_token=out.latency_tokens)
    log_prob.sum().backward()
    assert torch.isfinite(log_prob).all()


# --- the latency price and the budget-only ablation --------------------------------------------
def test_the_price_reaches_both_stages_and_the_probe():
    controller = make_controller("B", max_price=2.0)
    lang_feat, _ = features()
    budgets = torch.full((4,), float("inf"))  # no per-request budget: the average-latency mode
    cheap, dear = controller.encode_budget(budgets, torch.zeros(4)), controller.encode_budget(budgets, torch.full((4,), 2.0))
    assert not torch.allclose(cheap, dear)
    assert controller.budget_encoder.encoding_dim == 2 * (2 * 4 + 1)
    # Prices past the range saturate like budgets do; a negative or NaN price is refused.
    torch.testing.assert_close(controller.encode_budget(budgets, torch.full((4,), 50.0)), dear)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="prices must be finite and >= 0"):
            controller.encode_budget(budgets, torch.full((4,), bad))
    probe = make_controller("A", max_price=2.0).probe_embeddings(budgets, torch.full((4,), 1.0))
    assert probe.shape == (4, LATENCY_DIM)
    # A controller without a price input refuses a price (and ignores none).
    with pytest.raises(ValueError, match="no price input"):
        make_controller("B").encode_budget(BUDGETS, torch.ones(4))
    make_controller("B").encode_budget(BUDGETS, torch.zeros(4))


def test_the_budget_only_ablation_ignores_the_question():
    controller = make_controller("B", use_question=False)
    a, _ = features(4, seed=1)
    b, _ = features(4, seed=2)
    feat = controller.encode_budget(BUDGETS)
    for x, y in zip(controller.stage1_logits(a, feat), controller.stage1_logits(b, feat)):
        torch.testing.assert_close(x, y)
    position = torch.tensor([0, 1, 2, 0])
    for x, y in zip(controller.stage2_logits(position, a, feat), controller.stage2_logits(position, b, feat)):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="use_question"):
        ControllerConfig(use_question="no")


def test_joint_log_probs_equal_evaluate_actions_for_every_configuration():
    from knoblib.guard import open_mask

    controller = make_controller("B", max_price=2.0)
    with torch.no_grad():
        for p in controller.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lang_feat, _ = features(2)
    feat = controller.encode_budget(BUDGETS[:2], torch.tensor([0.0, 1.0]))
    mask = open_mask(SPACE, 2)
    mask[0, 2] = False  # the high tier does not fit the first request
    joint = controller.joint_log_probs(lang_feat, feat, mask)
    torch.testing.assert_close(joint.exp().flatten(1).sum(1), torch.ones(2))
    for knobs in SPACE:
        index = (
            SPACE.tiers.index(knobs.tier), knobs.insertion_position - 1,
            SPACE.top_k_options.index(knobs.top_k), SPACE.all_block_options.index(knobs.num_active_blocks),
        )
        rows = [1] if knobs.tier == "high" else [0, 1]
        expected, _ = controller.evaluate_actions(
            Decisions.from_knobs([knobs] * len(rows), SPACE), lang_feat[rows], feat[rows], mask[rows]
        )
        torch.testing.assert_close(joint[(rows, *index)], expected)
        if knobs.tier == "high":
            assert joint[(0, *index)] == -math.inf
