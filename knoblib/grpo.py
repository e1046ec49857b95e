"""Joint GRPO training of the two-stage controller.

One step, for a batch of B (image, question, budget) requests and a group of G rollouts
per request (N = B * G rows):

1. features: ``lang_feat`` (mean-pooled question embeddings) and ``budget_feat``;
2. Stage 1 samples (tier, insertion_position) per row;
3. Stage 2 samples (top_k, num_active_blocks) per row, from the latency token (Mode A)
   or from lang + budget + emb(p) (Mode B);
4. the VLM answers with each row's knobs; the reward is correctness minus the budget
   penalty, with the latency each configuration has *when served alone* (the profiled
   ``LatencyTable``), never the wall time of the batched run;
5. advantages are rewards normalised within each group; the clipped surrogate of the
   joint log-probability (the sum over the four choices) is maximised for a few inner
   iterations, with an optional KL term to a frozen reference and an entropy bonus.

The three execution modes differ only in step 3-4 and in the forwards they count:

* ``A-naive`` (the original system's baseline): a partial forward to p for the latency token, then a
  separate full forward: 2 G forwards per request (10 at G = 5);
* ``A-resumable``: one forward per rollout that pauses at p, lets Stage 2 decide and
  continues from the same hidden states and KV cache (G per request);
* ``B``: every knob is sampled before execution, the whole batch runs as one batched
  generate with per-row knobs (G per request).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .controller import Decisions, ModeADecider, TwoStageController
from .data import VQASample
from .features import LanguageFeatureExtractor, _as_budgets
from .guard import DEFAULT_QUANTILE, BudgetGuard
from .knobs import KnobConfig
from .latency import BudgetSampler, LatencyTable
from .reward import RewardConfig, compute_reward
from .vlm import KnobVLM

MODES = ("A-naive", "A-resumable", "B")
SCALE_REWARDS = ("group", "batch", "none")
WARM_START_TEACHERS = ("correctness", "critic", "oracle", "table", "family-table")
CHECKPOINT_FORMAT = "knoblib-grpo-checkpoint"
# On resume, ``steps`` may change freely (it only says where training stops); the warm
# start acts only when a run starts, so changing its settings on resume would record
# something that never ran.
RESUME_FREE_FIELDS = ("steps",)
START_ONLY_FIELDS = ("warm_start_steps", "warm_start_entropy", "warm_start_teacher", "distill_steps")


@dataclass
class GRPOConfig:
    """Arguments of joint GRPO training, grouped as TRL's ``GRPOConfig`` groups them.

    Where TRL (Hugging Face's ``trl.GRPOConfig``) has the same setting, its name is given
    in brackets, so a reader who knows TRL can map one onto the other.

    What is trained:
        mode: ``A-naive``, ``A-resumable`` or ``B`` (see the module docstring).
        use_question: False trains the budget-only ablation (the controller's
            ``config.use_question``): what the question adds over the budget and price.
        seed: seeds batches, budgets and knob sampling [``seed``].

    The loop and the optimizer:
        steps: optimizer steps; ``train`` stops there [``max_steps``].
        batch_size: B, requests per step (each with G rollouts).
        lr: Adam learning rate for the controller [``learning_rate``].
        max_grad_norm: gradient-norm clip [``max_grad_norm``].

    Generation (the rollouts):
        group_size: G, rollouts per request [``num_generations``].
        answer_tokens: most tokens decoded per rollout (answers are one word + eos)
            [``max_completion_length``].
        budget_margin: budgets are drawn from the achievable range widened by this
            fraction at both ends.
        average_fraction: share of training requests served the average-latency way: no
            per-request budget, a latency price ``max_price * u^2`` (``knoblib.reward``);
            the rest get a budget and price 0.
        max_price: the largest latency price trained on (the controller's
            ``config.max_price``); 0 trains per-request budgets only.
        budget_guard: mask options whose profiled latency cannot fit the budget
            (``knoblib.guard``), in sampling and in the log-probabilities.
        guard_quantile: the latency quantile the guard holds each configuration to
            (one the latency table keeps; ``knoblib.guard.DEFAULT_QUANTILE``).

    The loss:
        inner_iterations: policy-gradient passes over the same rollouts; > 1 makes the
            clipping matter, as the ratio to the rollout policy moves away from 1
            [``num_iterations``].
        clip_eps: PPO/GRPO clip range for the probability ratio [``epsilon``].
        kl_coef: weight of the KL term to the frozen reference controller, 0 = off [``beta``].
        entropy_coef: weight of the entropy bonus (sum over the four knobs); TRL has none.
        scale_rewards: ``group`` divides advantages by the group's std (the original
            GRPO), ``batch`` by the batch's std, ``none`` only subtracts the group mean
            (as in Dr. GRPO) [``scale_rewards``]. The default ``none``: dividing by a
            group's std blows tiny reward differences (a saving bonus among equally
            correct rollouts) up to unit size (docs/findings.md).
        skip_zero_std_groups: drop groups whose rewards are all equal from the loss
            (they carry no signal and would only dilute the mean).
        reward: the reward weights (``knoblib.reward.RewardConfig``) [``reward_weights``].

    Validation:
        val_every: steps between validations, 0 = never during training [``eval_steps``].
        val_size: validation requests (each at every budget of the sweep and price).
        val_budgets: budgets in the validation sweep.

    The warm start (before GRPO; Mode B only; ``train`` runs it when a run starts):
        warm_start_steps: its steps; 0 = start from scratch.
        warm_start_entropy: its entropy bonus (keeps GRPO exploring afterwards).
        warm_start_teacher: what it fits, all from measured accuracies:
            ``correctness`` (the default): the expected reward of every configuration on
            training questions, from their per-sample correctness
            (``JointGRPOTrainer.fit_to_correctness``); ``critic``: the same requests, each
            labelled with its best fitting configuration under a critic fitted to that
            correctness (``knoblib.critic``), learned by cross-entropy; ``oracle``: clone, per training
            question and budget, the cheapest configuration that answers it right within
            the budget (``oracle_teacher``); ``table``: the static lookup table;
            ``family-table``: the most accurate configuration for the request's family
            (reads the synthetic data's family label: an analysis bound, not a teacher
            a user could compute).

    The variants beyond Mode B (``knoblib.variants``; Mode B only):
        vision_stats: train the vision-aware Mode B (the controller's
            ``config.vision_stats``): Stage 2 also reads statistics of the vision features
            at the tier Stage 1 chose (``knoblib.vision_features``).
        hybrid: train a hybrid controller (the controller's ``config.hybrid``): its Mode-B
            head and Stage 1 by GRPO on batched Mode-B rollouts, its Mode-A head from the
            same rollouts (their generate also returns each row's latency token at its p),
            by the clipped surrogate with importance ratio pi_A / pi_B
            (``hybrid_grpo_coef``) and by distillation from the B head (``distill_coef``,
            ``distill_steps``).
        hybrid_grpo_coef: weight of the hybrid's A-head surrogate (0: the A head learns by
            distillation alone).
        distill_from: the folder of a trained Mode-A teacher whose distributions a Mode-B
            student learns to match (``knoblib.distill``); recorded here, loaded by the
            ``train`` command (``--distill-from``). Empty: no teacher (a hybrid's teacher is
            its own B head).
        distill_steps: steps of distillation before GRPO: the KL from the teacher's
            policy to the student's, on training requests, with the teacher's latency tokens
            from a partial forward (``knoblib.distill.distill``); after the warm start,
            if there is one.
        distill_coef: weight of the same KL alongside GRPO, at the rollouts' own states (the
            rollouts' batched generate returns the teacher's latency tokens: no extra forward).
    """

    mode: str = "B"
    group_size: int = 5
    batch_size: int = 8
    steps: int = 1500
    lr: float = 1e-3
    inner_iterations: int = 2
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.01
    scale_rewards: str = "none"
    skip_zero_std_groups: bool = True
    max_grad_norm: float = 1.0
    answer_tokens: int = 3
    budget_margin: float = 0.1
    budget_guard: bool = True
    guard_quantile: float = DEFAULT_QUANTILE
    average_fraction: float = 0.0
    max_price: float = 0.0
    use_question: bool = True
    val_every: int = 250
    val_size: int = 200
    val_budgets: int = 8
    seed: int = 0
    reward: RewardConfig = field(default_factory=RewardConfig)
    warm_start_steps: int = 0
    warm_start_entropy: float = 0.5
    warm_start_teacher: str = "correctness"
    vision_stats: bool = False
    hybrid: bool = False
    hybrid_grpo_coef: float = 1.0
    distill_from: str = ""
    distill_steps: int = 0
    distill_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: allowed {list(MODES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is invalid: allowed {list(SCALE_REWARDS)}")
        for name in ("group_size", "batch_size", "inner_iterations", "answer_tokens", "val_budgets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} is invalid: GRPO needs >= 2 rollouts per group")
        for name in ("lr", "clip_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} is invalid: must be a positive finite number")
        for name in ("kl_coef", "entropy_coef", "max_grad_norm", "steps", "val_every", "val_size", "warm_start_steps", "warm_start_entropy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} is invalid: must be >= 0")
        if not (0 <= self.average_fraction <= 1):
            raise ValueError(f"average_fraction={self.average_fraction} is invalid: must be in [0, 1]")
        if not (math.isfinite(self.max_price) and self.max_price >= 0):
            raise ValueError(f"max_price={self.max_price} is invalid: must be finite and >= 0")
        if self.average_fraction > 0 and self.max_price == 0:
            raise ValueError("average_fraction > 0 needs max_price > 0: the average-latency mode is steered by a price")
        if not (isinstance(self.guard_quantile, float) and 0.5 <= self.guard_quantile < 1):
            raise ValueError(f"guard_quantile={self.guard_quantile!r} is invalid: a float in [0.5, 1)")
        if self.warm_start_teacher not in WARM_START_TEACHERS:
            raise ValueError(f"warm_start_teacher={self.warm_start_teacher!r} is invalid: allowed {list(WARM_START_TEACHERS)}")
        if not isinstance(self.use_question, bool):
            raise ValueError(f"use_question={self.use_question!r} is invalid: must be True or False")
        if self.warm_start_steps and self.mode != "B":
            raise ValueError(f"warm_start_steps={self.warm_start_steps} needs mode 'B' (got {self.mode!r})")
        for name in ("vision_stats", "hybrid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be True or False")
            if getattr(self, name) and self.mode != "B":
                raise ValueError(f"{name}=True needs mode 'B' (got {self.mode!r})")
        if self.vision_stats and self.hybrid:
            raise ValueError("vision_stats=True and hybrid=True are separate variants: choose one")
        for name in ("hybrid_grpo_coef", "distill_coef", "distill_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is invalid: must be a finite number >= 0")
        if not isinstance(self.distill_from, str):
            raise ValueError(f"distill_from={self.distill_from!r} is invalid: a folder path (str), or '' for none")
        if self.distill_from and (self.mode != "B" or self.hybrid):
            raise ValueError(
                f"distill_from={self.distill_from!r} needs mode 'B' without hybrid (got mode={self.mode!r}, "
                f"hybrid={self.hybrid}): a Mode-B student learns from a Mode-A teacher; a hybrid's teacher is its own B head"
            )
        if (self.distill_steps or self.distill_coef) and not (self.distill_from or self.hybrid):
            raise ValueError(
                f"distill_steps={self.distill_steps}, distill_coef={self.distill_coef} need a teacher: distill_from "
                "(a Mode-A controller folder) or hybrid=True (the B head teaches the A head)"
            )
        if isinstance(self.reward, dict):
            self.reward = RewardConfig(**self.reward)

    @property
    def stage2_mode(self) -> str:
        """The controller's Stage-2 input mode this training mode needs (``A`` or ``B``)."""
        return "B" if self.mode == "B" else "A"


@dataclass
class Rollouts:
    """One step's N = B * G rollouts (rows grouped: request b owns rows b*G .. b*G+G-1).

    Attributes:
        decisions: the sampled knob indices (N,) each.
        knobs: the same as ``KnobConfig`` objects.
        lang_feat: (N, d) question features; budgets: (N,) ms on this machine (``inf``: no
            per-request budget); budget_ratio: (N,) the same relative to the full
            configuration's latency; prices: (N,) latency prices (0 for a per-request budget).
        mask: (N, T, P, K, NB) the budget guard's feasibility mask, or None.
        latency_tokens: (N, d) Mode-A latency tokens, or None in Mode B.
        old_log_prob: (N,) joint log-prob under the policy that sampled.
        correct: (N,) bool; latency_ms: (N,) from the table; reward: (N,).
        partial_forwards / full_forwards: forwards counted for this step.
        vision_feat: (N, 2 d) the vision statistics at each row's tier (vision-aware Mode B), or None.
    """

    decisions: Decisions
    knobs: list[KnobConfig]
    lang_feat: torch.Tensor
    budgets: torch.Tensor
    budget_ratio: torch.Tensor
    prices: torch.Tensor
    mask: torch.Tensor | None
    latency_tokens: torch.Tensor | None
    old_log_prob: torch.Tensor
    correct: torch.Tensor
    latency_ms: torch.Tensor
    reward: torch.Tensor
    partial_forwards: int
    full_forwards: int
    vision_feat: torch.Tensor | None = None


@dataclass
class ControlledRun:
    """The controller's decisions for N rows and the VLM's answers under them.

    Attributes:
        decisions / knobs: what the controller chose, as indices and as ``KnobConfig``.
        answers: the VLM's answer per row.
        lang_feat: (N, d); budget_feat: (N, budget_dim); latency_tokens: (N, d) or None.
        mask: (N, T, P, K, NB) the feasibility mask the choices were made under, or None.
        partial_forwards / full_forwards: forwards this run counted.
        vision_feat: (N, 2 d) the vision statistics Stage 2 read (vision-aware Mode B), or None.
    """

    decisions: Decisions
    knobs: list[KnobConfig]
    answers: list[str]
    lang_feat: torch.Tensor
    budget_feat: torch.Tensor
    latency_tokens: torch.Tensor | None
    mask: torch.Tensor | None
    partial_forwards: int
    full_forwards: int
    vision_feat: torch.Tensor | None = None


@torch.no_grad()
def run_controller(
    vlm: KnobVLM,
    controller: TwoStageController,
    language: LanguageFeatureExtractor,
    images: list[torch.Tensor],
    questions: list[str],
    budgets: torch.Tensor,
    table: LatencyTable,
    mode: str,
    answer_tokens: int,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    guard: BudgetGuard | None = None,
    prices: torch.Tensor | None = None,
    probe_embeddings: torch.Tensor | None = None,
    reuse_vision: bool = True,
) -> ControlledRun:
    """Let the controller pick each row's knobs (sampled or greedy) and run the VLM with them.

    ``budgets`` (N,) are milliseconds on this machine (``inf``: no per-request budget); the
    controller sees them relative to ``table``'s full-configuration latency, with the
    latency ``prices`` (N,) (None: 0). ``mode`` is how Stage 2 gets its input and how
    the VLM is executed (see the module docstring): ``B`` decides everything first and runs
    one batched generate; ``A-resumable`` pauses each row's forward at its p; ``A-naive``
    runs a separate partial forward first (counted as extra forwards). With a ``guard``,
    options whose profiled latency cannot fit each row's budget are closed in every choice.

    Mode B with ``config.vision_stats``: after Stage 1, the vision statistics at each row's
    tier (``knoblib.vision_features``) feed Stage 2; with ``reuse_vision`` the generate that
    follows reuses those vision features instead of running the vision tower again. Mode B
    with ``probe_embeddings`` (N, d): the batched generate also reads each row's latency
    token at its p from that probe (a hybrid's A head, a distillation teacher), at the
    cost of one more prefill position, and returns it as ``latency_tokens``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: allowed {list(MODES)}")
    budgets = _as_budgets(budgets, allow_inf=True).double()
    if len(budgets) != len(questions):
        raise ValueError(f"got {len(budgets)} budgets for {len(questions)} questions: give one per request")
    space = vlm.knob_space
    n = len(questions)
    lang = language(questions)
    ratio = table.relative(budgets)
    budget_feat = controller.encode_budget(ratio, prices)
    mask = None if guard is None else guard.mask(budgets)
    tier, pos = controller.sample_stage1(lang, budget_feat, mask, generator=generator, greedy=greedy)
    stage1 = [(space.tiers[t], space.insertion_positions[p]) for t, p in zip(tier.tolist(), pos.tolist())]
    latency_tokens = None
    vision_feat = None
    partial = 0
    if probe_embeddings is not None and mode != "B":
        raise ValueError(f"probe_embeddings is for Mode B rollouts (mode={mode!r} reads its own latency tokens)")
    if mode == "B":
        from contextlib import nullcontext

        from .vision_features import reuse_image_features, vision_statistics

        vision = bool(getattr(controller.config, "vision_stats", False))
        with reuse_image_features(vlm) if vision and reuse_vision else nullcontext():
            if vision:
                vision_feat = vision_statistics(vlm, images, [t for t, _ in stage1])
            topk, blocks = controller.sample_stage2(
                tier, pos, lang_feat=lang, budget_feat=budget_feat, mask=mask, generator=generator, greedy=greedy,
                vision_feat=vision_feat,
            )
            decisions = Decisions(tier, pos, topk, blocks)
            out = vlm.generate(
                images, questions, decisions.to_knobs(space), answer_tokens, probe_embeddings=probe_embeddings
            )
        latency_tokens = out.latency_tokens
    elif mode == "A-naive":
        probe = controller.probe_embeddings(ratio, prices)
        latency_tokens = vlm.partial_forward(images, questions, stage1, probe)
        partial = n
        topk, blocks = controller.sample_stage2(
            tier, pos, latency_token=latency_tokens, mask=mask, generator=generator, greedy=greedy
        )
        decisions = Decisions(tier, pos, topk, blocks)
        out = vlm.generate(images, questions, decisions.to_knobs(space), answer_tokens)
    else:
        decider = ModeADecider(controller, tier, pos, mask, generator=generator, greedy=greedy)
        out = vlm.generate(
            images, questions, None, answer_tokens,
            probe_embeddings=controller.probe_embeddings(ratio, prices), decide=decider, stage1=stage1,
        )
        latency_tokens = decider.latency_tokens
        decisions = decider.decisions()
    return ControlledRun(
        decisions, decisions.to_knobs(space), out.answers, lang, budget_feat, latency_tokens, mask, partial, n, vision_feat
    )


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6):
    """GRPO advantages: (r - mean of its group) / std, with the std per group, batch or 1.

    Args:
        rewards: (N,) with N = B * group_size, grouped contiguously.

    Returns:
        (advantages (N,), zero_std (B,) bool: groups whose rewards are all equal).
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    centred = grouped - mean
    if scale == "group":
        adv = centred / (std + eps)
    elif scale == "batch":
        adv = centred / (rewards.std(unbiased=True) + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards={scale!r} is invalid: allowed {list(SCALE_REWARDS)}")
    return adv.reshape(-1), std.squeeze(1) < eps


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    mask: torch.Tensor | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO surrogate (DeepSeekMath eq. 3) for one-action "sequences".

    ``L = -mean[min(rho A, clip(rho, 1-eps, 1+eps) A) - beta KL]`` with
    ``rho = exp(log_prob - old_log_prob)`` and the unbiased KL estimator
    ``KL = exp(ref - log_prob) - (ref - log_prob) - 1``. ``mask`` (N,) bool selects
    the rows that count (zero-std groups removed).

    Returns (loss, stats with clip_fraction and kl).
    """
    # Rewards (hence advantages and the mask) are computed on the CPU from the latency
    # table; the loss lives where the controller does.
    device = log_prob.device
    old_log_prob, advantages = old_log_prob.to(device), advantages.to(device)
    if ref_log_prob is not None:
        ref_log_prob = ref_log_prob.to(device)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(log_prob)
    if ref_log_prob is not None:
        delta = ref_log_prob - log_prob
        kl = torch.exp(delta) - delta - 1.0
    objective = objective - kl_coef * kl
    mask = torch.ones_like(log_prob, dtype=torch.bool) if mask is None else mask.to(device)
    count = mask.sum().clamp(min=1)
    loss = -(objective * mask).sum() / count
    clip_fraction = (((ratio - 1.0).abs() > clip_eps) & mask).sum() / count
    return loss, {"clip_fraction": float(clip_fraction), "kl": float((kl.detach() * mask).sum() / count)}


class JointGRPOTrainer:
    """Trains both controller stages jointly with GRPO on a frozen ``KnobVLM``.

    Args:
        vlm: the frozen VLM (answers, latency tokens).
        controller: the ``TwoStageController`` being trained (its Stage-2 mode must
            match ``cfg.stage2_mode``).
        table: the profiled latency of every configuration on this machine.
        train / val: the request pools (samples; budgets are drawn per request).
        cfg: ``GRPOConfig``.
        reference: a frozen controller for the KL term (default: a copy at start).
        teacher: the trained Mode-A controller a Mode-B student is distilled from
            (``cfg.distill_steps`` / ``cfg.distill_coef`` with ``cfg.distill_from``), frozen.
    """

    def __init__(
        self,
        vlm: KnobVLM,
        controller: TwoStageController,
        table: LatencyTable,
        train: list[VQASample],
        val: list[VQASample],
        cfg: GRPOConfig,
        reference: TwoStageController | None = None,
        teacher: TwoStageController | None = None,
    ) -> None:
        if controller.config.mode != cfg.stage2_mode:
            raise ValueError(
                f"controller mode {controller.config.mode!r} does not match training mode {cfg.mode!r} "
                f"(which needs a Stage-2 mode {cfg.stage2_mode!r} controller)"
            )
        if bool(getattr(controller.config, "budget_guard", False)) != cfg.budget_guard:
            raise ValueError(
                f"controller budget_guard={controller.config.budget_guard} does not match training "
                f"budget_guard={cfg.budget_guard}"
            )
        if controller.config.max_price != cfg.max_price or controller.config.use_question != cfg.use_question:
            raise ValueError(
                f"controller max_price={controller.config.max_price}, use_question={controller.config.use_question} "
                f"do not match training max_price={cfg.max_price}, use_question={cfg.use_question}"
            )
        for name in ("vision_stats", "hybrid"):
            if getattr(controller.config, name, False) != getattr(cfg, name):
                raise ValueError(
                    f"controller {name}={getattr(controller.config, name, False)} does not match training {name}={getattr(cfg, name)}"
                )
        if (cfg.distill_from and (cfg.distill_steps or cfg.distill_coef)) or teacher is not None:
            from .distill import check_teacher

            check_teacher(teacher, controller, cfg)
        table.check_space(vlm.knob_space)
        if controller.knob_space != vlm.knob_space:
            raise ValueError(f"controller knob space {controller.knob_space} differs from the VLM's {vlm.knob_space}")
        if not train:
            raise ValueError("train is empty: need at least one request")
        # The VLM stays frozen: rollouts run under no_grad / inference_mode and only the
        # controller's parameters are in the optimizer (its requires_grad flags are left as
        # the caller set them).
        self.vlm = vlm.eval()
        self.controller = controller
        self.table = table
        self.train_samples = train
        self.val_samples = val[: cfg.val_size]
        self.cfg = cfg
        self.space = vlm.knob_space
        self.language = LanguageFeatureExtractor(vlm.input_embeddings, vlm.tokenizer)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(reference or controller).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=cfg.lr)
        self.budgets = BudgetSampler(table, margin=cfg.budget_margin, seed=cfg.seed)
        self.guard = BudgetGuard(table, self.space, cfg.guard_quantile) if cfg.budget_guard else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.data_rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.step_count = 0
        self.history: list[dict] = []
        self.best_val_reward = -math.inf
        self._images: dict[str, torch.Tensor] = {}
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(controller.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # --- data ---------------------------------------------------------------------
    def image(self, sample: VQASample) -> torch.Tensor:
        if sample.uid not in self._images:
            self._images[sample.uid] = sample.image()
        return self._images[sample.uid]

    def next_batch(self) -> tuple[list[VQASample], torch.Tensor, torch.Tensor]:
        """B requests (cycling through shuffled epochs), their budgets (B,) ms and prices (B,)."""
        while len(self.order) < self.cfg.batch_size:
            fresh = list(range(len(self.train_samples)))
            self.data_rng.shuffle(fresh)
            self.order += fresh
        idx, self.order = self.order[: self.cfg.batch_size], self.order[self.cfg.batch_size :]
        budgets, prices = self.request_conditions(len(idx), self.budgets.generator)
        return [self.train_samples[i] for i in idx], budgets, prices

    def request_conditions(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(budgets (n,) ms, prices (n,)): a share ``average_fraction`` with no budget (inf) and a
        price ``max_price * u^2`` (u uniform), the others a budget from the sampler and price 0."""
        # On the CPU, like the latency table and the guard that read them.
        budgets = self.budgets.low + torch.rand(n, generator=generator, dtype=torch.float64, device="cpu") * (
            self.budgets.high - self.budgets.low
        )
        prices = torch.zeros(n, dtype=torch.float64, device="cpu")
        if self.cfg.average_fraction > 0:
            average = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu") < self.cfg.average_fraction
            # u^2: denser at low prices, where a small change of price moves the accuracy most.
            drawn = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu") ** 2 * self.cfg.max_price
            budgets = torch.where(average, torch.full_like(budgets, math.inf), budgets)
            prices = torch.where(average, drawn, prices)
        return budgets, prices

    def _price(self, prices: torch.Tensor) -> torch.Tensor | None:
        """The prices for the controller's encoder (None for a controller without a price input)."""
        return prices if self.controller.config.max_price > 0 else None

    # --- rollouts -----------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self, samples: list[VQASample], budgets: torch.Tensor, greedy: bool = False, group_size=None,
        prices: torch.Tensor | None = None,
    ):
        """Sample G configurations per request, run the VLM with each and score them."""
        G = self.cfg.group_size if group_size is None else group_size
        rows = [s for s in samples for _ in range(G)]
        budgets = torch.as_tensor(budgets, dtype=torch.float64).repeat_interleave(G)
        prices = torch.zeros_like(budgets) if prices is None else torch.as_tensor(prices, dtype=torch.float64).repeat_interleave(G)
        run = run_controller(
            self.vlm,
            self.controller,
            self.language,
            [self.image(s) for s in rows],
            [s.question for s in rows],
            budgets,
            self.table,
            self.cfg.mode,
            self.cfg.answer_tokens,
            generator=None if greedy else self.generator,
            greedy=greedy,
            guard=self.guard,
            prices=prices if self.controller.config.max_price > 0 else None,
            probe_embeddings=None if greedy else self._rollout_probe(budgets, prices),
        )
        correct = torch.tensor([a == s.answer for a, s in zip(run.answers, rows)])
        latency_ms = self.table.latencies(run.knobs)
        reward, _ = compute_reward(correct, latency_ms, budgets, self.cfg.reward, prices, self.table.reference_ms)
        old_log_prob, _ = self.controller.evaluate_actions(
            run.decisions, run.lang_feat, run.budget_feat, run.mask, run.latency_tokens, run.vision_feat
        )
        return Rollouts(
            run.decisions,
            run.knobs,
            run.lang_feat,
            budgets,
            self.table.relative(budgets),
            prices,
            run.mask,
            run.latency_tokens,
            old_log_prob,
            correct,
            latency_ms,
            reward,
            run.partial_forwards,
            run.full_forwards,
            run.vision_feat,
        )

    def _rollout_probe(self, budgets: torch.Tensor, prices: torch.Tensor) -> torch.Tensor | None:
        """The probe a Mode-B rollout's generate reads latency tokens from: the hybrid's own (for
        its A head), the teacher's (distillation alongside GRPO), else None (no latency token)."""
        if self.cfg.mode != "B":
            return None
        source = None
        if self.cfg.hybrid:
            source = self.controller
        elif self.teacher is not None and self.cfg.distill_coef > 0:
            source = self.teacher
        if source is None:
            return None
        price = prices if source.config.max_price > 0 else None
        return source.probe_embeddings(self.table.relative(budgets), price).to(self.vlm.device)

    # --- one step -----------------------------------------------------------------
    def train_step(self, batch: tuple | None = None) -> dict:
        """One joint GRPO step; returns its metrics (also appended to ``history``).

        ``batch``: (samples, budgets (B,) ms) or (samples, budgets, prices (B,)); default
        ``next_batch()``.
        """
        start = time.perf_counter()
        samples, budgets, *rest = self.next_batch() if batch is None else batch
        prices = rest[0] if rest else None
        if len(samples) != len(budgets):
            raise ValueError(f"batch has {len(samples)} samples but {len(budgets)} budgets")
        self.controller.eval()
        ro = self.rollout(samples, budgets, prices=prices)
        rollout_s = time.perf_counter() - start
        cfg = self.cfg
        advantages, zero_std = group_advantages(ro.reward, cfg.group_size, cfg.scale_rewards)
        mask = torch.ones_like(ro.reward, dtype=torch.bool)
        if cfg.skip_zero_std_groups:
            mask = (~zero_std).repeat_interleave(cfg.group_size)
        ref_log_prob = None
        if self.reference is not None:
            with torch.no_grad():
                ref_feat = self.reference.encode_budget(ro.budget_ratio, self._price(ro.prices))
                ref_log_prob, _ = self.reference.evaluate_actions(
                    ro.decisions, ro.lang_feat, ref_feat, ro.mask, ro.latency_tokens, ro.vision_feat
                )
        # Distillation alongside GRPO and the hybrid's A head: their fixed parts (the teacher's
        # distributions, the B head's log-probabilities at sampling) are computed once per step.
        from .distill import auxiliary_losses

        auxiliary = auxiliary_losses(self, ro, advantages, mask)
        self.controller.train()
        stats: dict = {}
        aux_stats: dict = {}
        for _ in range(cfg.inner_iterations):
            budget_feat = self.controller.encode_budget(ro.budget_ratio, self._price(ro.prices))
            log_prob, entropies = self.controller.evaluate_actions(
                ro.decisions, ro.lang_feat, budget_feat, ro.mask, ro.latency_tokens, ro.vision_feat
            )
            loss, stats = grpo_loss(log_prob, ro.old_log_prob, advantages, cfg.clip_eps, mask, ref_log_prob, cfg.kl_coef)
            entropy = sum(entropies.values()).mean()
            total = loss - cfg.entropy_coef * entropy
            if auxiliary is not None:
                extra, aux_stats = auxiliary(budget_feat)
                total = total + extra
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.controller.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
        self.controller.eval()
        self.step_count += 1
        violation = ro.latency_ms > ro.budgets
        capped = torch.isfinite(ro.budgets)
        metrics = {
            "step": self.step_count,
            "mode": cfg.mode,
            "reward_mean": float(ro.reward.mean()),
            "reward_std": float(ro.reward.std()),
            "accuracy": float(ro.correct.float().mean()),
            # Over the requests that have a budget (the average-latency ones have none).
            "latency_over_budget": float((ro.latency_ms / ro.budgets)[capped].mean()) if bool(capped.any()) else 0.0,
            "mean_latency_over_full": float((ro.latency_ms / self.table.reference_ms).mean()),
            "violation_rate": float(violation.float().mean()),
            **{f"entropy_{k}": float(v.detach().mean()) for k, v in entropies.items()},
            "clip_fraction": stats["clip_fraction"],
            "kl": stats["kl"],
            "zero_std_fraction": float(zero_std.float().mean()),
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "partial_forwards": ro.partial_forwards,
            "full_forwards": ro.full_forwards,
            "forwards_per_request": (ro.partial_forwards + ro.full_forwards) / len(samples),
            "rollout_time_s": rollout_s,
            **aux_stats,
            "step_time_s": time.perf_counter() - start,
        }
        self.history.append(metrics)
        return metrics

    # --- warm start ---------------------------------------------------------------
    def warm_start(
        self, teacher, steps: int, batch_size: int = 64, lr: float = 3e-3, entropy_coef: float = 0.0, seed: int | None = None
    ) -> list[float]:
        """Behaviour cloning before GRPO: fit the controller to a teacher's choices.

        ``teacher(sample, budget_ms) -> KnobConfig`` is a policy over training requests:
        the static lookup table (``LookupTablePolicy.choose_one`` of the budget alone) or
        the per-family table (``FamilyTablePolicy.choose_one`` of the sample's family and
        the budget), both built from validation accuracies (``knoblib.evaluate``). For
        ``steps`` steps, ``batch_size`` training questions are paired with fresh budgets
        and the controller's joint log-probability of the teacher's configuration is
        maximised. The controller itself only sees the question and the budget, so from
        a per-family teacher it learns to tell the families apart from the question's
        words. GRPO then starts from the teacher's behaviour instead of from uniform
        choices; with ``kl_coef > 0`` the reference becomes the warm-started controller,
        so the KL term keeps the policy near it where the rewards do not say otherwise.
        ``entropy_coef`` keeps the cloned policy from collapsing onto the teacher's choice:
        a collapsed policy samples the same configuration G times, every group has zero
        reward variance, and GRPO gets no gradient at all.

        Mode B only: Mode A's Stage 2 reads a latency token, which needs a VLM forward
        per (question, budget, p). The budgets and questions come from generators of
        their own (seeded), so the GRPO steps that follow are the same with or without a
        warm start apart from the weights. Returns the per-step negative log-likelihood.
        """
        if self.controller.config.mode != "B":
            raise ValueError("warm_start needs a Mode-B controller: Mode A's Stage 2 reads latency tokens")
        if self.step_count:
            raise ValueError(f"warm_start must run before GRPO (this trainer is at step {self.step_count})")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"warm_start needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
        seed = self.cfg.seed + 1 if seed is None else seed
        rng = random.Random(seed)
        budgets = BudgetSampler(self.table, margin=self.cfg.budget_margin, seed=seed)
        optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.controller.train()
        losses = []
        for _ in range(steps):
            rows = rng.sample(self.train_samples, min(batch_size, len(self.train_samples)))
            b = budgets.sample(len(rows))
            chosen = [teacher(row, float(x)) for row, x in zip(rows, b)]
            decisions = Decisions.from_knobs(chosen, self.space)
            mask = None
            if self.guard is not None:
                mask = self.guard.mask(b)
                fits = self.guard.latency(
                    decisions.tier, decisions.insertion_position, decisions.top_k, decisions.num_active_blocks
                ) <= b.clamp(min=self.guard.fastest_ms)
                if not bool(fits.all()):
                    row = int((~fits).nonzero()[0])
                    knobs = chosen[row]
                    raise ValueError(
                        f"the teacher chose {knobs.short()} ({self.table.latency(knobs, self.guard.quantile):.2f} ms at "
                        f"p{round(100 * self.guard.quantile)}) at a budget of {float(b[row]):.2f} ms, which the budget "
                        "guard masks: a teacher must pick configurations that fit"
                    )
            lang = self.language([s.question for s in rows])
            vision = None
            if getattr(self.controller.config, "vision_stats", False):
                from .vision_features import vision_statistics

                vision = vision_statistics(self.vlm, [self.image(s) for s in rows], [k.tier for k in chosen])
            log_prob, entropies = self.controller.evaluate_actions(
                decisions, lang, self.controller.encode_budget(self.table.relative(b)), mask, vision_feat=vision
            )
            loss = -log_prob.mean() - entropy_coef * sum(entropies.values()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(-log_prob.detach().mean()))
        self.controller.eval()
        # GRPO starts with a fresh optimizer; the KL anchor is the cloned policy.
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.cfg.lr)
        if self.reference is not None:
            self.reference.load_state_dict(self.controller.state_dict())
        return losses

    # --- fitting to per-sample correctness ------------------------------------------------
    def fit_to_correctness(
        self,
        correctness,
        steps: int,
        batch_size: int = 256,
        lr: float = 1e-3,
        entropy_coef: float = 0.0,
        seed: int | None = None,
        critic: bool = False,
    ) -> list[float]:
        """Warm start from per-sample correctness: maximise the expected reward over every configuration.

        ``correctness`` (``knoblib.correctness.Correctness``, measured on training questions)
        says which configurations answer each question right. For a question, a budget and
        a price, the reward of *every* configuration is then known without running the
        model, so the controller's expected reward ``sum_c pi(c | x) r(x, c)`` can be
        maximised exactly: a full-information policy gradient over the 54 configurations,
        instead of GRPO's 5 sampled ones. Requests are drawn as GRPO draws them (budgets,
        prices) under the same budget guard. It needs answers, not the family labels of
        the synthetic data, so a user can compute it on their own data.

        Why not clone the per-sample oracle (the cheapest configuration that answers each
        question right): for a question family that a cheap configuration answers right
        only sometimes (``count``: 57 % at the cheapest configuration, 89 % at the full
        one), the oracle's label is the cheap configuration for most of those questions
        and an expensive one for the rest; a clone's most likely choice is then the cheap
        one, 30 points below what the family needs. The expected reward weighs each
        configuration by how often it is right, which is what serving it will earn.

        The defaults (256 requests a step, lr 1e-3, a few thousand steps) are what fitted the
        small accuracy differences that decide the highest budgets: at lr 3e-3 and 64
        requests the policy settled on one mid-priced configuration for every budget and
        price (docs/findings.md).

        With ``critic=True`` (``--warm-start-teacher critic``) the same requests are labelled
        instead: a ``knoblib.critic.CorrectnessCritic`` fitted to the same correctness table
        predicts how likely each configuration is to answer the question, and the label is
        the fitting configuration of the highest expected reward under those predictions;
        the controller maximises the log-probability of the label (cross-entropy). The
        expected-reward gradient of a configuration is its probability times its reward
        gap, which vanishes where configurations differ by a few points (the highest
        budgets) and the policy stays spread over them; a label's does not
        (docs/findings.md). Returns the negative expected reward (under the critic, with a
        critic) of the controller's policy per step.

        Mode B only (Mode A's Stage 2 needs a latency token from a VLM forward per question,
        budget and p). Uses its own seeded generators, resets Adam afterwards and, with
        ``kl_coef > 0``, makes the fitted controller the KL reference.
        """
        from .guard import open_mask

        if self.controller.config.mode != "B":
            raise ValueError("fit_to_correctness needs a Mode-B controller: Mode A's Stage 2 reads latency tokens")
        if self.step_count:
            raise ValueError(f"fit_to_correctness must run before GRPO (this trainer is at step {self.step_count})")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"fit_to_correctness needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
        space = self.space
        missing = [k.short() for k in space if k not in set(correctness.configs)]
        if missing:
            raise ValueError(f"the correctness table lacks configurations {missing[:3]}: measure the whole knob space")
        # Each configuration's place in the (T, P, K, NB) grid, its latency and its column.
        grid = [
            (
                space.tiers.index(k.tier),
                space.insertion_positions.index(k.insertion_position),
                space.top_k_options.index(k.top_k),
                space.all_block_options.index(k.num_active_blocks),
            )
            for k in space
        ]
        index = tuple(torch.tensor(axis) for axis in zip(*grid))
        columns = torch.tensor([correctness.column(k) for k in space])
        latency = self.table.latencies(list(space))
        by_uid = {s.uid: s for s in self.train_samples}
        rows = [r for r, uid in enumerate(correctness.uids) if uid in by_uid]
        if not rows:
            raise ValueError("none of the correctness table's questions is in the training pool")
        vision = None
        if getattr(self.controller.config, "vision_stats", False):
            # The vision statistics of every training question at every tier, once (vision tower only).
            from .vision_features import vision_statistics_all_tiers

            vision = torch.zeros(len(correctness.uids), len(space.tiers), 2 * self.controller.config.lang_dim)
            for start in range(0, len(rows), 100):
                chunk = rows[start : start + 100]
                images = [self.image(by_uid[correctness.uids[r]]) for r in chunk]
                vision[chunk] = vision_statistics_all_tiers(self.vlm, images).cpu()
        seed = self.cfg.seed + 2 if seed is None else seed
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        judge = None
        if critic:
            from .critic import CorrectnessCritic

            questions = [by_uid[correctness.uids[r]].question for r in rows]
            with torch.no_grad():
                lang_all = torch.cat([self.language(questions[i : i + 512]) for i in range(0, len(questions), 512)])
            judge = CorrectnessCritic.fit(lang_all, correctness.correct[rows][:, columns], seed=seed)
        optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        shape = (len(space.tiers), len(space.insertion_positions), len(space.top_k_options), len(space.all_block_options))
        valid = torch.zeros(shape, dtype=torch.bool)
        valid[index] = True
        self.controller.train()
        losses = []
        for _ in range(steps):
            picked = rng.sample(rows, min(batch_size, len(rows)))
            n = len(picked)
            budgets, prices = self.request_conditions(n, generator)
            lang = self.language([by_uid[correctness.uids[r]].question for r in picked])
            # The critic's predicted correctness, or each question's measured one.
            correct = judge.predict(lang) if judge is not None else correctness.correct[picked][:, columns].float()  # (n, C)
            reward, _ = compute_reward(
                correct.reshape(-1),
                latency.repeat(n),
                budgets.repeat_interleave(len(space)),
                self.cfg.reward,
                prices.repeat_interleave(len(space)),
                self.table.reference_ms,
            )
            mask = (self.guard.mask(budgets) if self.guard is not None else open_mask(space, n)) & valid
            reward_grid = torch.zeros(n, *shape)
            reward_grid[(slice(None), *index)] = reward.view(n, -1)
            budget_feat = self.controller.encode_budget(self.table.relative(budgets), self._price(prices))
            log_prob = self.controller.joint_log_probs(
                lang, budget_feat, mask, None if vision is None else vision[picked]
            )  # (n, T, P, K, NB)
            prob = log_prob.exp()
            expected = (prob * reward_grid).flatten(1).sum(1)
            entropy = -(prob * log_prob.masked_fill(~torch.isfinite(log_prob), 0.0)).flatten(1).sum(1)
            if judge is not None:
                # Cross-entropy to the best fitting configuration under the critic.
                label = reward_grid.masked_fill(~mask, -math.inf).flatten(1).argmax(1, keepdim=True)
                loss = -log_prob.flatten(1).gather(1, label).mean() - entropy_coef * entropy.mean()
            else:
                loss = -expected.mean() - entropy_coef * entropy.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.controller.parameters(), self.cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(-expected.detach().mean()))
        self.controller.eval()
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.cfg.lr)
        if self.reference is not None:
            self.reference.load_state_dict(self.controller.state_dict())
        return losses

    # --- validation ---------------------------------------------------------------
    def val_budgets(self) -> torch.Tensor:
        return self.budgets.sweep(self.cfg.val_budgets)

    @torch.no_grad()
    def validate(self) -> dict:
        """Greedy decisions on the validation requests (deterministic).

        Per-request mode: each request at every sweep budget. With a price input, also the
        average-latency mode: each request without a budget at three prices in (0, max_price].
        ``val_reward`` averages both.
        """
        conditions = [(budget, 0.0) for budget in self.val_budgets().tolist()]
        if self.cfg.max_price > 0:
            conditions += [(math.inf, float(p)) for p in torch.linspace(0, self.cfg.max_price, 4)[1:]]
        results = {"correct": [], "violation": [], "ratio": [], "reward": [], "average_correct": [], "average_latency": []}
        for budget, price in conditions:
            for start in range(0, len(self.val_samples), 32):
                chunk = self.val_samples[start : start + 32]
                n = len(chunk)
                ro = self.rollout(
                    chunk, torch.full((n,), budget, dtype=torch.float64), greedy=True, group_size=1,
                    prices=torch.full((n,), price, dtype=torch.float64),
                )
                results["reward"].append(ro.reward)
                if math.isfinite(budget):
                    results["correct"].append(ro.correct.float())
                    results["violation"].append((ro.latency_ms > ro.budgets).float())
                    results["ratio"].append(ro.latency_ms / ro.budgets)
                else:
                    results["average_correct"].append(ro.correct.float())
                    results["average_latency"].append(ro.latency_ms / self.table.reference_ms)
        cat = {k: torch.cat(v) for k, v in results.items() if v}
        metrics = {
            "val_accuracy": float(cat["correct"].mean()),
            "val_violation_rate": float(cat["violation"].mean()),
            "val_latency_over_budget": float(cat["ratio"].mean()),
            "val_reward": float(cat["reward"].mean()),
        }
        if "average_correct" in cat:
            metrics["val_average_accuracy"] = float(cat["average_correct"].mean())
            metrics["val_average_latency_over_full"] = float(cat["average_latency"].mean())
        return metrics

    # --- the loop -----------------------------------------------------------------
    def train(self, out_dir: str | Path | None = None, progress: bool = True, callback=None) -> list[dict]:
        """Run until ``cfg.steps``; validate, log metrics (JSONL) and checkpoint (best and last)."""
        from tqdm.auto import tqdm

        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        if out is not None and self.cfg.val_every and self.step_count == 0:
            # The starting point (after a warm start: the fitted controller) is validated too
            # and competes for "best": GRPO has to beat it to replace it.
            start = {"step": 0, "mode": self.cfg.mode, **self.validate()}
            self.best_val_reward = start["val_reward"]
            self.save_checkpoint(out / "best")
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(start) + "\n")
        bar = tqdm(total=self.cfg.steps, initial=self.step_count, desc=f"GRPO {self.cfg.mode}", disable=not progress)
        while self.step_count < self.cfg.steps:
            metrics = self.train_step()
            if self.cfg.val_every and (self.step_count % self.cfg.val_every == 0 or self.step_count == self.cfg.steps):
                metrics.update(self.validate())
                if out is not None and metrics["val_reward"] > self.best_val_reward:
                    self.best_val_reward = metrics["val_reward"]
                    self.save_checkpoint(out / "best")
                self.best_val_reward = max(self.best_val_reward, metrics["val_reward"])
            if out is not None:
                with open(out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
                if self.cfg.val_every and self.step_count % self.cfg.val_every == 0 or self.step_count == self.cfg.steps:
                    self.save_checkpoint(out / "last")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if callback is not None:
                callback(metrics)
        bar.close()
        return self.history

    # --- checkpoints --------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": _jsonable(asdict(self.cfg)),
            "step": self.step_count,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "budget_generator": self.budgets.generator.get_state(),
            "data_rng": self.data_rng.getstate(),
            "order": list(self.order),
            "history": self.history,
            "best_val_reward": self.best_val_reward,
            "reference": None if self.reference is None else self.reference.state_dict(),
        }

    def save_checkpoint(self, path: str | Path) -> None:
        """Write controller + trainer state to ``path`` atomically (a temp dir, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            self.controller.save_pretrained(tmp)
            torch.save(self.state(), tmp / "trainer_state.pt")
            old = path.with_name(path.name + ".old")
            if path.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def load_checkpoint(self, path: str | Path, override: bool = False) -> None:
        """Resume exactly: controller weights, optimizer, RNGs, data order, history.

        The checkpoint's config must equal this trainer's, except ``steps`` (a run may be
        continued for longer or shorter). Otherwise a ``ValueError`` lists each changed
        setting with its saved and requested value. With ``override=True`` this trainer's
        settings run from here on, and they are what later checkpoints record: a new
        ``lr`` is written into the restored optimizer, a new ``seed`` reseeds the batch,
        budget and knob generators at the resume point, and a KL term switched on here
        takes the resumed controller as its reference. The warm-start settings cannot
        change (the warm start only runs when a run starts).
        """
        path = Path(path)
        state = read_checkpoint_state(path)
        saved_mode = state["config"].get("mode")
        if saved_mode != self.cfg.mode:
            raise ValueError(f"checkpoint at {path} was trained in mode {saved_mode!r}, this trainer is {self.cfg.mode!r}")
        check_resume_config(state["config"], self.cfg, override, path)
        loaded = TwoStageController.load(path, expected_space=self.space, expected_mode=self.controller.config.mode)
        self.controller.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.budgets.generator.set_state(state["budget_generator"])
        self.data_rng.setstate(_tupleize(state["data_rng"]))
        self.order = list(state["order"])
        self.step_count = int(state["step"])
        self.history = list(state["history"])
        self.best_val_reward = float(state["best_val_reward"])
        if self.reference is not None:
            saved_reference = state["reference"]
            self.reference.load_state_dict(saved_reference if saved_reference is not None else self.controller.state_dict())
        # The restored optimizer carries the saved learning rate: the one that runs is this config's.
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr
        if state["config"].get("seed") != self.cfg.seed:
            self.generator.manual_seed(self.cfg.seed)
            self.budgets.generator.manual_seed(self.cfg.seed)
            self.data_rng.seed(self.cfg.seed)


def read_checkpoint_state(path: str | Path) -> dict:
    """The trainer state saved in checkpoint folder ``path`` (errors name the file and the problem)."""
    path = Path(path)
    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"no GRPO checkpoint at {path}: trainer_state.pt is missing")
    try:
        # CPU first: the loads copy into the controller / optimizer on their device.
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{state_file} is corrupt (truncated or not a checkpoint): {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_file} is not a knoblib GRPO checkpoint")
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{state_file} is corrupt: it holds no training config")
    return state


def check_resume_config(saved: dict, requested: GRPOConfig, override: bool, path: str | Path) -> None:
    """Refuse to resume the checkpoint at ``path`` (config ``saved``) with other settings unless ``override``.

    The ``ValueError`` lists each changed setting as ``name: saved X, requested Y``.
    ``steps`` may always change; the warm-start settings never (see ``load_checkpoint``).
    """
    changes = config_changes(saved, requested)
    fixed = [c for c in changes if c[0] in START_ONLY_FIELDS]
    if fixed:
        raise ValueError(
            f"checkpoint at {path}: the warm start only runs when a run starts, so its settings cannot change on "
            "resume: " + _format_changes(fixed)
        )
    if changes and not override:
        raise ValueError(
            f"checkpoint at {path} was trained with other settings: {_format_changes(changes)}. Resume with the "
            "saved settings, or pass override=True (--override) to run and record the new ones"
        )


def checkpoint_config(path: str | Path) -> GRPOConfig:
    """The ``GRPOConfig`` a checkpoint folder was trained with."""
    state = read_checkpoint_state(path)
    try:
        return GRPOConfig(**state["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{Path(path) / 'trainer_state.pt'} holds an invalid training config: {err}") from err


def config_changes(saved: dict, requested: GRPOConfig) -> list[tuple[str, object, object]]:
    """(name, saved value, requested value) for each setting that differs, ``steps`` excepted."""
    saved_flat = _flatten(saved)
    requested_flat = _flatten(_jsonable(asdict(requested)))
    names = sorted(set(saved_flat) | set(requested_flat))
    return [
        (name, saved_flat.get(name), requested_flat.get(name))
        for name in names
        if name not in RESUME_FREE_FIELDS and saved_flat.get(name) != requested_flat.get(name)
    ]


def _format_changes(changes: list[tuple[str, object, object]]) -> str:
    return "; ".join(f"{name}: saved {old!r}, requested {new!r}" for name, old, new in changes)


def _flatten(config: dict, prefix: str = "") -> dict:
    """``{"reward": {"saving_bonus": x}}`` -> ``{"reward.saving_bonus": x}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _tupleize(value):
    """``random.Random.setstate`` needs tuples; torch.save keeps them, JSON would not."""
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value
