"""Distillation between controllers, and the hybrid's Mode-A head.

Two of the original system's ideas for when Mode B loses to Mode A:

* **Distillation** (``GRPOConfig.distill_from``, ``distill_steps``, ``distill_coef``): a
  Mode-B student learns to match a trained Mode-A teacher's policy. The teacher sees the
  latency token, the student does not, so the student can only learn what of the
  teacher's behaviour its own inputs predict. The loss is the KL divergence from the
  teacher's distributions to the student's, ``KL(teacher || student)``, over the whole
  policy: Stage 1 (tier, p) exactly, and Stage 2 (top_k, num_active_blocks) at the
  states (tier, p) of the requests, where the teacher reads its latency token:

  - *before GRPO* (:func:`distill`): on training requests at fresh budgets and prices,
    the states drawn from the teacher's Stage 1, the teacher's latency tokens from a
    partial forward (vision + blocks [0, p)), as many steps as ``distill_steps``;
  - a teacher without a price input (``max_price`` 0) is distilled on per-request
    budgets only; a student trained with prices learns those from GRPO alone;
  - *alongside GRPO* (:func:`auxiliary_losses`, weight ``distill_coef``): at the
    rollouts' own states. The rollouts' batched generate is given the teacher's probe,
    so it returns each row's latency token at its p: no extra forward.

* **The hybrid** (``ControllerConfig.hybrid``, ``GRPOConfig.hybrid``): one Stage 1, a
  Mode-B head and a Mode-A head. GRPO trains Stage 1 and the B head on batched Mode-B
  rollouts, whose generate also returns each row's latency token (the hybrid's own
  probe). The A head learns from the same rollouts in two ways:

  - the clipped surrogate with the rollouts' advantages and the importance ratio
    pi_A(top_k, blocks) / pi_B(top_k, blocks) (the B head sampled them), weight
    ``hybrid_grpo_coef``;
  - distillation from the B head, ``KL(B || A)`` on Stage 2 at the rollouts' states,
    weight ``distill_coef`` (and ``distill_steps`` before GRPO).

  Served as B (``served_as("B")``) it is a plain Mode-B controller; served as A, its
  Stage 2 decides at the pause of a resumable forward, from the latency token.

All distributions here are taken under the budget guard's mask (the same slices sampling
uses), so options that cannot fit carry no probability for either side.
"""

from __future__ import annotations

import random

import torch

from .controller import Decisions, TwoStageController
from .guard import top_k_options


# --- distributions over every option ---------------------------------------------------------
def _log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log_softmax over the allowed options, -inf elsewhere (rows with nothing allowed: all -inf)."""
    return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, float("-inf"))


def stage1_log_probs(
    controller: TwoStageController, lang_feat: torch.Tensor, budget_feat: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log pi(tier, p) of every Stage-1 choice, (N, T, P); -inf where closed.

    The tier under the tiers that have a fitting configuration, p under the positions that
    still fit given that tier (``mask`` (N, T, P, K, NB), None: everything open).
    """
    tier_logits, position_logits = controller.stage1_logits(lang_feat, budget_feat)
    n, num_t = tier_logits.shape
    num_p = position_logits.shape[1]
    if mask is None:
        tier_allowed = torch.ones_like(tier_logits, dtype=torch.bool)
        position_allowed = torch.ones(n, num_t, num_p, dtype=torch.bool, device=tier_logits.device)
    else:
        mask = mask.to(tier_logits.device)
        tier_allowed, position_allowed = mask.flatten(2).any(-1), mask.flatten(3).any(-1)
    log_tier = _log_softmax(tier_logits, tier_allowed)
    log_position = _log_softmax(position_logits[:, None, :].expand(n, num_t, num_p), position_allowed)
    return log_tier[..., None] + log_position


def stage2_log_probs(
    controller: TwoStageController,
    tier_idx: torch.Tensor,
    insertion_position_idx: torch.Tensor,
    lang_feat: torch.Tensor | None = None,
    budget_feat: torch.Tensor | None = None,
    latency_token: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    vision_feat: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(top_k, blocks | tier, p) of every Stage-2 choice at each row's state, (N, K, NB); -inf where closed.

    Inputs as ``TwoStageController.stage2_logits`` (each mode reads its own). The top-k is
    taken under the options that still fit, the blocks under those that fit given the top-k
    (and that p allows).
    """
    top_k_logits, block_logits = controller.stage2_logits(
        insertion_position_idx, lang_feat, budget_feat, latency_token, vision_feat=vision_feat
    )
    n, num_k = top_k_logits.shape
    num_b = block_logits.shape[1]
    device = top_k_logits.device
    p_allows = torch.isfinite(block_logits)[:, None, :].expand(n, num_k, num_b)
    if mask is None:
        top_k_allowed = torch.ones_like(top_k_logits, dtype=torch.bool)
        block_allowed = p_allows
    else:
        mask = mask.to(device)
        tier, position = tier_idx.to(device), insertion_position_idx.to(device)
        top_k_allowed = top_k_options(mask, tier, position)
        block_allowed = mask[torch.arange(n, device=device), tier, position] & p_allows
    log_top_k = _log_softmax(top_k_logits, top_k_allowed)
    log_blocks = _log_softmax(block_logits[:, None, :].expand(n, num_k, num_b), block_allowed)
    return log_top_k[..., None] + log_blocks


def kl_divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, (N,), from log-probabilities over the same options (N, ...).

    Sums over the options the teacher gives probability; an option the student closes but the
    teacher does not gives +inf (never happens when both read the same mask).
    """
    t, s = teacher_log_probs.flatten(1), student_log_probs.flatten(1)
    support = torch.isfinite(t)
    # Zeros off the support keep -inf - -inf (NaN) out of the graph.
    t_safe = torch.where(support, t, torch.zeros_like(t))
    s_safe = torch.where(support, s, torch.zeros_like(s))
    return torch.where(support, t_safe.exp() * (t_safe - s_safe), torch.zeros_like(t)).sum(-1) + torch.where(
        support & ~torch.isfinite(s), torch.full_like(s, float("inf")), torch.zeros_like(s)
    ).sum(-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy per row, (N,), of log-probabilities over options (N, ...) with -inf where closed."""
    flat = log_probs.flatten(1)
    finite = torch.isfinite(flat)
    safe = torch.where(finite, flat, torch.zeros_like(flat))
    return -torch.where(finite, safe.exp() * safe, torch.zeros_like(flat)).sum(-1)


def taken(log_probs: torch.Tensor, decisions: Decisions) -> torch.Tensor:
    """The log-probability (N,) of each row's taken (top_k, blocks) in a Stage-2 table (N, K, NB)."""
    rows = torch.arange(log_probs.shape[0], device=log_probs.device)
    return log_probs[rows, decisions.top_k.to(log_probs.device), decisions.num_active_blocks.to(log_probs.device)]


# --- who teaches whom ---------------------------------------------------------------------------
def check_teacher(teacher: TwoStageController | None, student: TwoStageController, cfg) -> None:
    """``ValueError`` unless ``teacher`` can teach ``student`` under ``cfg`` (a ``GRPOConfig``)."""
    wants = bool(cfg.distill_from) and bool(cfg.distill_steps or cfg.distill_coef)
    if wants and teacher is None:
        raise ValueError(
            f"distill_from={cfg.distill_from!r} with distill_steps={cfg.distill_steps}, distill_coef={cfg.distill_coef}: "
            "pass the loaded teacher (teacher=TwoStageController.load(distill_from))"
        )
    if teacher is None:
        return
    if not wants:
        raise ValueError(
            "a teacher was given, but the config does not distil: set distill_from and distill_steps or distill_coef"
        )
    if teacher.mode != "A":
        raise ValueError(f"the teacher must be a Mode-A controller (it reads the latency token), got Mode {teacher.mode}")
    if teacher.knob_space != student.knob_space:
        raise ValueError(f"teacher knob space {teacher.knob_space} differs from the student's {student.knob_space}")
    for name in ("lang_dim", "latency_dim"):
        if getattr(teacher.config, name) != getattr(student.config, name):
            raise ValueError(
                f"teacher {name}={getattr(teacher.config, name)} differs from the student's {getattr(student.config, name)}: "
                "both must read the same requests (the same VLM)"
            )
    priced = teacher.config.max_price > 0 and student.config.max_price > 0
    if priced and teacher.config.max_price != student.config.max_price:
        raise ValueError(
            f"teacher max_price={teacher.config.max_price} differs from the student's {student.config.max_price}: "
            "a price means something else to each"
        )


def teacher_and_student(trainer) -> tuple[TwoStageController, TwoStageController]:
    """(teacher, student) of a trainer's distillation: the Mode-A teacher and the controller, or,
    in a hybrid, its B head (served as B) and its A head (served as A)."""
    if trainer.cfg.hybrid:
        return trainer.controller.served_as("B"), trainer.controller.served_as("A")
    if trainer.teacher is None:
        raise ValueError("this trainer has no teacher: give JointGRPOTrainer(teacher=...) with cfg.distill_from")
    return trainer.teacher, trainer.controller


def _price(controller: TwoStageController, prices: torch.Tensor) -> torch.Tensor | None:
    return prices if controller.config.max_price > 0 else None


def readable(teacher: TwoStageController, prices: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the requests the teacher can read. A teacher without a price input (``max_price``
    0) reads per-request budgets only, so requests served at a latency price (price > 0, no
    budget) are not distilled; GRPO alone trains the student on them."""
    if teacher.config.max_price > 0:
        return torch.ones(prices.shape[0], dtype=torch.bool)
    return prices.cpu() == 0


# --- before GRPO ---------------------------------------------------------------------------------
def distill(trainer, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int | None = None) -> list[float]:
    """Distil the teacher's policy into the student for ``steps`` steps before GRPO; return the mean KL per step.

    Each step: ``batch_size`` training questions (their images) at fresh budgets and prices,
    drawn as GRPO draws them; the teacher's Stage-1 distribution, and one state (tier, p)
    per request drawn from it; the teacher's latency tokens at those states from one
    batched partial forward (vision + blocks [0, p)); the student's distributions (with
    the vision statistics at the drawn tier, for a vision-aware student). The loss is
    ``KL(teacher || student)`` of Stage 1 plus that of Stage 2 at the drawn state: in
    expectation, the KL of the whole policy. In a hybrid (teacher: its B head, student:
    its A head; one shared Stage 1), only the A head is trained. The trainer's optimizer
    is reset afterwards and, with ``kl_coef > 0``, the KL reference becomes the result.
    Uses generators of its own (seeded), like the warm start.
    """
    from .vision_features import vision_statistics

    if trainer.step_count:
        raise ValueError(f"distill must run before GRPO (this trainer is at step {trainer.step_count})")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"distill needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    teacher, student = teacher_and_student(trainer)
    shared_stage1 = teacher.stage1 is student.stage1
    trained = list(student.stage2.parameters()) if shared_stage1 else list(student.parameters())
    seed = trainer.cfg.seed + 3 if seed is None else seed
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(trained, lr=lr)
    space = trainer.space
    num_p = len(space.insertion_positions)
    reads_token = "A" in (teacher.mode, student.mode)
    probe_source = teacher if teacher.mode == "A" else student
    vision = any(getattr(c.config, "vision_stats", False) for c in (teacher, student))
    trainer.controller.train()
    losses = []
    for _ in range(steps):
        rows = rng.sample(trainer.train_samples, min(batch_size, len(trainer.train_samples)))
        n = len(rows)
        budgets, prices = trainer.request_conditions(n, generator)
        if not bool(readable(teacher, prices).all()):
            # A teacher without a price input reads budgets only: those requests get one.
            budgets = trainer.budgets.low + torch.rand(n, generator=generator, dtype=torch.float64) * (
                trainer.budgets.high - trainer.budgets.low
            )
            prices = torch.zeros(n, dtype=torch.float64)
        ratio = trainer.table.relative(budgets)
        mask = trainer.guard.mask(budgets) if trainer.guard is not None else None
        questions = [s.question for s in rows]
        images = [trainer.image(s) for s in rows]
        lang = trainer.language(questions)
        with torch.no_grad():
            teacher_feat = teacher.encode_budget(ratio, _price(teacher, prices))
            teacher_stage1 = stage1_log_probs(teacher, lang, teacher_feat, mask)
            state = torch.multinomial(teacher_stage1.flatten(1).exp().cpu(), 1, generator=generator).squeeze(1)
            tier, position = state // num_p, state % num_p
            tiers = [space.tiers[t] for t in tier.tolist()]
            tokens = None
            if reads_token:
                stage1 = [(t, space.insertion_positions[p]) for t, p in zip(tiers, position.tolist())]
                probe = probe_source.probe_embeddings(ratio, _price(probe_source, prices)).to(trainer.vlm.device)
                tokens = trainer.vlm.partial_forward(images, questions, stage1, probe)
            vision_feat = vision_statistics(trainer.vlm, images, tiers) if vision else None
            teacher_stage2 = stage2_log_probs(teacher, tier, position, lang, teacher_feat, tokens, mask, vision_feat)
        student_feat = student.encode_budget(ratio, _price(student, prices))
        kl = kl_divergence(teacher_stage2, stage2_log_probs(student, tier, position, lang, student_feat, tokens, mask, vision_feat))
        if not shared_stage1:
            kl = kl + kl_divergence(teacher_stage1, stage1_log_probs(student, lang, student_feat, mask))
        loss = kl.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, trainer.cfg.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    trainer.controller.eval()
    trainer.optimizer = torch.optim.Adam(trainer.controller.parameters(), lr=trainer.cfg.lr)
    if trainer.reference is not None:
        trainer.reference.load_state_dict(trainer.controller.state_dict())
    return losses


# --- alongside GRPO ---------------------------------------------------------------------------------
def auxiliary_losses(trainer, ro, advantages: torch.Tensor, mask: torch.Tensor):
    """The extra loss of one GRPO step, or None: ``loss_fn(budget_feat) -> (loss, stats)``.

    Called once per step with the rollouts ``ro``, their advantages (N,) and the rows that
    count (N,) bool; what does not change during the step's inner iterations (the teacher's
    distributions, the B head's log-probabilities at sampling) is computed here, once.

    * distillation (``distill_coef > 0`` with a teacher): ``distill_coef * KL(teacher ||
      student)``, Stage 1 plus Stage 2 at the rollouts' states, mean over rows;
    * hybrid: ``hybrid_grpo_coef`` x the clipped surrogate of the A head (ratio
      pi_A / pi_B of the taken Stage-2 choice, the rollouts' advantages) plus
      ``distill_coef * KL(B head || A head)``, minus the entropy bonus of the A head.
    """
    from .grpo import grpo_loss

    cfg = trainer.cfg
    hybrid = cfg.hybrid
    if not hybrid and not (trainer.teacher is not None and cfg.distill_coef > 0):
        return None
    if ro.latency_tokens is None:
        raise ValueError("the rollouts carry no latency tokens: a Mode-B rollout needs probe_embeddings for them")
    teacher, student = teacher_and_student(trainer)
    decisions = ro.decisions
    tier, position = decisions.tier, decisions.insertion_position
    device = trainer.controller.device
    with torch.no_grad():
        teacher_feat = teacher.encode_budget(ro.budget_ratio, _price(teacher, ro.prices))
        teacher_stage2 = stage2_log_probs(teacher, tier, position, ro.lang_feat, teacher_feat, ro.latency_tokens, ro.mask, ro.vision_feat)
        teacher_stage1 = None if hybrid else stage1_log_probs(teacher, ro.lang_feat, teacher_feat, ro.mask)
        old = taken(teacher_stage2, decisions)
    advantages, mask = advantages.to(device), mask.to(device)
    # The rows whose request the teacher can read (all, unless it has no price input).
    rows = readable(teacher, ro.prices).to(device)

    def loss_fn(budget_feat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        student_stage2 = stage2_log_probs(
            student, tier, position, ro.lang_feat, budget_feat, ro.latency_tokens, ro.mask, ro.vision_feat
        )
        kl = kl_divergence(teacher_stage2, student_stage2)
        if teacher_stage1 is not None:
            kl = kl + kl_divergence(teacher_stage1, stage1_log_probs(student, ro.lang_feat, budget_feat, ro.mask))
        kl = (kl * rows).sum() / rows.sum().clamp(min=1)
        loss = cfg.distill_coef * kl
        stats = {"distill_kl": float(kl.detach())}
        if hybrid:
            surrogate, surrogate_stats = grpo_loss(taken(student_stage2, decisions), old, advantages, cfg.clip_eps, mask)
            a_entropy = entropy(student_stage2).mean()
            loss = loss + cfg.hybrid_grpo_coef * surrogate - cfg.entropy_coef * a_entropy
            stats.update(
                a_head_loss=float(surrogate.detach()),
                a_head_clip_fraction=surrogate_stats["clip_fraction"],
                a_head_entropy=float(a_entropy.detach()),
            )
        return loss, stats

    return loss_fn
