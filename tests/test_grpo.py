"""Joint GRPO: the math on hand-made groups, forward counts, batched = alone, exact resume, bad inputs."""

import copy
import json
import math

import pytest
import torch

from knoblib.controller import ControllerConfig, TwoStageController
from knoblib.grpo import GRPOConfig, JointGRPOTrainer, group_advantages, grpo_loss, run_controller
from knoblib.latency import BudgetSampler


def make_trainer(tiny_vlm, table, pool, **overrides):
    cfg = GRPOConfig(**{"steps": 4, "batch_size": 2, "val_every": 0, "val_size": 4, "seed": 0, **overrides})
    sampler = BudgetSampler(table, margin=cfg.budget_margin)
    config = ControllerConfig.for_vlm(
        tiny_vlm, sampler.relative_range, mode=cfg.stage2_mode, seed=0, max_price=cfg.max_price, use_question=cfg.use_question
    )
    return JointGRPOTrainer(tiny_vlm, TwoStageController(config), table, pool[:16], pool[16:], cfg)


def test_group_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(rewards, 5, "group")
    g = rewards[:5]
    expected = (g - g.mean()) / (g.std(unbiased=True) + 1e-6)
    torch.testing.assert_close(adv[:5], expected)
    assert zero.tolist() == [False, True]
    assert torch.all(adv[5:] == 0)
    adv_none, _ = group_advantages(rewards, 5, "none")
    torch.testing.assert_close(adv_none[:5], g - g.mean())
    adv_batch, _ = group_advantages(rewards, 5, "batch")
    torch.testing.assert_close(adv_batch[:5], (g - g.mean()) / (rewards.std(unbiased=True) + 1e-6))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 5, "median")


def test_grpo_loss_matches_deepseekmath_by_hand():
    log_prob = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    old = torch.tensor([-1.2, -1.5, -0.5, -2.5])
    ref = torch.tensor([-1.1, -1.9, -0.7, -1.0])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    eps, beta = 0.2, 0.1
    loss, stats = grpo_loss(log_prob, old, adv, eps, ref_log_prob=ref, kl_coef=beta)
    terms, clipped = [], 0
    for lp, o, r, a in zip(log_prob.tolist(), old.tolist(), ref.tolist(), adv.tolist()):
        rho = math.exp(lp - o)
        surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        kl = math.exp(r - lp) - (r - lp) - 1
        terms.append(surrogate - beta * kl)
        clipped += abs(rho - 1) > eps
    assert float(loss) == pytest.approx(-sum(terms) / 4, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(clipped / 4)
    masked, _ = grpo_loss(log_prob, old, adv, eps, mask=torch.tensor([True, False, True, False]))
    first = [min(math.exp(lp - o) * a, min(max(math.exp(lp - o), 1 - eps), 1 + eps) * a) for lp, o, a in
             [(-1.0, -1.2, 1.0), (-0.5, -0.5, 0.5)]]
    assert float(masked) == pytest.approx(-sum(first) / 2, rel=1e-6)


@pytest.mark.parametrize("mode, forwards", [("A-naive", 10), ("A-resumable", 5), ("B", 5)])
def test_forward_counts_per_request(tiny_vlm, table, pool, mode, forwards):
    trainer = make_trainer(tiny_vlm, table, pool, mode=mode)
    metrics = trainer.train_step()
    assert metrics["forwards_per_request"] == forwards
    assert metrics["partial_forwards"] == (10 if mode == "A-naive" else 0)
    assert metrics["full_forwards"] == 10  # 2 requests x G=5
    for key in ("reward_mean", "reward_std", "accuracy", "latency_over_budget", "violation_rate", "clip_fraction",
                "kl", "zero_std_fraction", "step_time_s", "entropy_tier", "entropy_num_active_blocks"):
        assert math.isfinite(metrics[key]), key


def test_batched_rollouts_equal_each_configuration_alone(tiny_vlm, table, pool):
    trainer = make_trainer(tiny_vlm, table, pool, mode="B")
    samples, budgets, _ = trainer.next_batch()
    run = run_controller(
        tiny_vlm, trainer.controller, trainer.language,
        [s.image() for s in samples for _ in range(5)], [s.question for s in samples for _ in range(5)],
        budgets.repeat_interleave(5), table, "B", 3, generator=torch.Generator().manual_seed(1),
    )
    assert len(set(run.knobs)) > 1, "the group should hold different configurations"
    rows = [s for s in samples for _ in range(5)]
    alone = [tiny_vlm.generate([s.image()], [s.question], k, 3).answers[0] for s, k in zip(rows, run.knobs)]
    assert run.answers == alone


@pytest.mark.parametrize("mode", ["B", "A-resumable"])
def test_resume_reproduces_the_uninterrupted_run(tiny_vlm, table, pool, tmp_path, mode):
    straight = make_trainer(tiny_vlm, table, pool, mode=mode, inner_iterations=2)
    expected = [straight.train_step() for _ in range(3)]

    first = make_trainer(tiny_vlm, table, pool, mode=mode, inner_iterations=2)
    first.train_step()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = make_trainer(tiny_vlm, table, pool, mode=mode, inner_iterations=2)
    resumed.load_checkpoint(tmp_path / "ckpt")
    got = [resumed.train_step() for _ in range(2)]
    for a, b in zip(expected[1:], got):
        for key in ("reward_mean", "loss", "accuracy", "latency_over_budget", "grad_norm"):
            assert a[key] == b[key], key
    for p, q in zip(straight.controller.parameters(), resumed.controller.parameters()):
        assert torch.equal(p, q)


def test_train_writes_metrics_and_atomic_checkpoints(tiny_vlm, table, pool, tmp_path):
    trainer = make_trainer(tiny_vlm, table, pool, mode="B", steps=2, val_every=1, val_size=4)
    trainer.train(tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # Step 0 (the untrained or warm-started controller) is validated too: it competes for best/.
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert (tmp_path / "best" / "trainer_state.pt").is_file()
    assert (tmp_path / "last" / "trainer_state.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]


def test_validation_is_deterministic(tiny_vlm, table, pool):
    trainer = make_trainer(tiny_vlm, table, pool, mode="B")
    assert trainer.validate() == trainer.validate()


def test_bad_inputs(tiny_vlm, table, pool, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        GRPOConfig(mode="C")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="lr"):
        GRPOConfig(lr=float("nan"))
    trainer = make_trainer(tiny_vlm, table, pool, mode="B")
    samples, _, _ = trainer.next_batch()
    for bad in (torch.tensor([-5.0, 10.0]), torch.tensor([0.0, 10.0]), torch.tensor([float("nan"), 10.0])):
        with pytest.raises(ValueError):
            trainer.train_step((samples, bad))
    # A Mode-B controller cannot drive Mode-A training.
    b_controller = trainer.controller
    with pytest.raises(ValueError, match="mode"):
        JointGRPOTrainer(tiny_vlm, b_controller, table, pool, pool, GRPOConfig(mode="A-resumable"))
    # A checkpoint from another mode is refused; a missing one names the path.
    trainer.save_checkpoint(tmp_path / "b")
    other = make_trainer(tiny_vlm, table, pool, mode="A-resumable")
    with pytest.raises(ValueError, match="mode"):
        other.load_checkpoint(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        other.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "b" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        trainer.load_checkpoint(tmp_path / "b")


def test_kl_term_uses_a_frozen_reference(tiny_vlm, table, pool):
    trainer = make_trainer(tiny_vlm, table, pool, mode="B", kl_coef=0.1, inner_iterations=3)
    ref = copy.deepcopy(trainer.reference.state_dict())
    metrics = trainer.train_step()
    assert metrics["kl"] >= 0
    for k, v in trainer.reference.state_dict().items():
        assert torch.equal(v, ref[k])


def test_warm_start_clones_the_teacher_and_anchors_the_kl(tiny_vlm, table, pool):
    from knoblib.controller import Decisions

    trainer = make_trainer(tiny_vlm, table, pool, mode="B", kl_coef=0.1)
    space = trainer.space
    # A budget-only teacher: the most expensive configuration that fits (like the lookup table).
    by_latency = sorted(space, key=table.latency)

    def teacher(sample, budget):
        fits = [k for k in by_latency if table.latency(k) <= budget]
        return fits[-1] if fits else by_latency[0]

    losses = trainer.warm_start(teacher, steps=150, batch_size=16)
    assert losses[-1] < 0.5 * losses[0]
    # The cloned policy puts most of its mass on the teacher's configuration.
    budgets = BudgetSampler(table, seed=99).sample(32)
    lang = trainer.language([s.question for s in pool[:16]] * 2)
    decisions = Decisions.from_knobs([teacher(None, float(b)) for b in budgets], space)
    with torch.no_grad():
        log_prob, _ = trainer.controller.evaluate_actions(
            decisions, lang, trainer.controller.encode_budget(table.relative(budgets)), trainer.guard.mask(budgets)
        )
    assert log_prob.exp().mean() > 0.5
    # The KL anchor is the cloned policy, and GRPO can start from it.
    for k, v in trainer.reference.state_dict().items():
        assert torch.equal(v, trainer.controller.state_dict()[k])
    assert trainer.train_step()["step"] == 1
    with pytest.raises(ValueError, match="before GRPO"):
        trainer.warm_start(teacher, steps=1)
    with pytest.raises(ValueError, match="Mode-B"):
        make_trainer(tiny_vlm, table, pool, mode="A-resumable").warm_start(teacher, steps=1)
    with pytest.raises(ValueError, match="warm_start_steps"):
        GRPOConfig(mode="A-resumable", warm_start_steps=10)
    # A teacher that picks configurations the budget cannot fit is named, not trained on.
    greedy_teacher = make_trainer(tiny_vlm, table, pool, mode="B")
    with pytest.raises(ValueError, match="budget guard masks"):
        greedy_teacher.warm_start(lambda sample, budget: by_latency[-1], steps=1)


# --- the latency price and the correctness fit ------------------------------------------------------
def test_average_latency_requests_have_no_budget_and_a_price(tiny_vlm, table, pool):
    trainer = make_trainer(tiny_vlm, table, pool, mode="B", average_fraction=0.5, max_price=2.0, batch_size=64)
    assert trainer.controller.config.max_price == 2.0
    samples, budgets, prices = trainer.next_batch()
    no_budget = torch.isinf(budgets)
    assert 0 < int(no_budget.sum()) < 64
    assert bool((prices[~no_budget] == 0).all()) and bool((prices[no_budget] <= 2.0).all())
    metrics = trainer.train_step((samples[:2], budgets[:2], prices[:2]))
    assert math.isfinite(metrics["reward_mean"]) and metrics["mean_latency_over_full"] > 0
    val = trainer.validate()
    assert {"val_average_accuracy", "val_average_latency_over_full"} <= set(val)
    with pytest.raises(ValueError, match="needs max_price > 0"):
        GRPOConfig(average_fraction=0.5)


def test_fit_to_correctness_raises_the_expected_reward(tiny_vlm, table, pool):
    from knoblib.correctness import Correctness

    trainer = make_trainer(tiny_vlm, table, pool, mode="B", average_fraction=0.5, max_price=2.0, kl_coef=0.1)
    space = trainer.space
    configs = list(space)
    # A made-up truth: only the high tier answers right (the cheapest high configuration is what pays).
    correct = torch.tensor([[k.tier == "high" for k in configs]] * 16)
    table_c = Correctness(correct, [s.uid for s in pool[:16]], [s.family for s in pool[:16]], configs, "train")
    losses = trainer.fit_to_correctness(table_c, steps=80, batch_size=16, entropy_coef=0.01)
    assert losses[-1] < losses[0] - 0.1
    # Where the budget allows the high tier, the fitted controller takes it greedily.
    lang = trainer.language([pool[0].question])
    budget = torch.tensor([table.max_ms], dtype=torch.float64)
    feat = trainer.controller.encode_budget(table.relative(budget), torch.zeros(1))
    tier, _ = trainer.controller.sample_stage1(lang, feat, trainer.guard.mask(budget), greedy=True)
    assert space.tiers[int(tier)] == "high"
    for k, v in trainer.reference.state_dict().items():  # the KL anchor is the fitted policy
        assert torch.equal(v, trainer.controller.state_dict()[k])
    with pytest.raises(ValueError, match="before GRPO"):
        trainer.train_step()
        trainer.fit_to_correctness(table_c, steps=1)
    with pytest.raises(ValueError, match="Mode-B"):
        make_trainer(tiny_vlm, table, pool, mode="A-resumable").fit_to_correctness(table_c, steps=1)


def test_fit_to_the_critic_labels_the_best_fitting_configuration(tiny_vlm, table, pool):
    """The critic teacher: the controller learns the configuration the critic ranks best among those that fit."""
    from knoblib.correctness import Correctness

    trainer = make_trainer(tiny_vlm, table, pool, mode="B", average_fraction=0.5, max_price=2.0)
    space = trainer.space
    configs = list(space)
    correct = torch.tensor([[k.tier == "high" for k in configs]] * 16)
    table_c = Correctness(correct, [s.uid for s in pool[:16]], [s.family for s in pool[:16]], configs, "train")
    losses = trainer.fit_to_correctness(table_c, steps=80, batch_size=16, entropy_coef=0.0, critic=True)
    assert losses[-1] < losses[0] - 0.1  # the expected reward under the critic rose
    lang = trainer.language([pool[0].question])
    budget = torch.tensor([table.max_ms], dtype=torch.float64)
    feat = trainer.controller.encode_budget(table.relative(budget), torch.zeros(1))
    tier, _ = trainer.controller.sample_stage1(lang, feat, trainer.guard.mask(budget), greedy=True)
    assert space.tiers[int(tier)] == "high"


def test_the_critic_learns_which_questions_each_configuration_answers():
    from knoblib.critic import CorrectnessCritic

    generator = torch.Generator().manual_seed(0)
    lang = torch.randn(400, 16, generator=generator)
    group = lang[:, 0] > 0  # configuration 0 answers one kind of question, configuration 1 the other
    correct = torch.stack([group, ~group, torch.ones_like(group)], dim=1)
    critic = CorrectnessCritic.fit(lang, correct, steps=300, batch_size=64, seed=0)
    predicted = critic.predict(lang)
    assert predicted.shape == (400, 3)
    assert float(((predicted[:, 0] > 0.5) == group).float().mean()) > 0.95
    assert float(predicted[:, 2].min()) > 0.9
    again = CorrectnessCritic.fit(lang, correct, steps=300, batch_size=64, seed=0).predict(lang)
    assert torch.equal(predicted, again)  # seeded
    with pytest.raises(ValueError, match="must be"):
        CorrectnessCritic.fit(lang, correct[:10])
