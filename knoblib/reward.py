"""The GRPO reward: answer correctness, minus a latency-budget violation penalty, minus a latency price.

``compute_reward`` is the one the trainer uses::

    reward = correct_weight * correct
             - [L > B] * (violation_penalty + overshoot_weight * (L - B) / B)
             + saving_bonus * (1 - L / B) * [L <= B]
             - price * L / L_full

with L the latency of the chosen configuration served alone (from the profiled table),
B the request's budget and L_full the full configuration's latency, all in milliseconds
of this machine. Two ways to serve, one reward:

* **per-request budget** (price 0): the budget is a cap. At the defaults a violation
  never pays (a correct answer over budget scores at most 0, a wrong one under budget at
  least 0), and the *saving bonus* pays for latency left unused, so two equally accurate
  configurations are not worth the same: the cheaper one wins. Its weight decides how
  much accuracy a saving may cost: at 0.03 a configuration that saves 40 % of the budget
  is worth 1.2 points of accuracy, no more.
* **average-latency budget** (B = inf: no cap): a stream is served at a target *mean*
  latency, and a request may spend more or less than the mean. The latency *price*
  lambda turns that into a per-request reward (the Lagrangian of "maximise accuracy
  subject to mean latency <= target"); ``knoblib.plane.find_price`` picks lambda on
  validation so the stream's mean latency hits the target.

``original_reward`` is the original implementation's formula (see docs/background.md),
kept for comparison in the notebooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class RewardConfig:
    """Weights of the reward terms.

    Attributes:
        correct_weight: reward for a correct answer.
        violation_penalty: flat cost of exceeding the budget at all. At least
            ``correct_weight`` means no correct answer is worth a violation.
        overshoot_weight: extra cost per unit of relative overshoot ``(L - B) / B``, so
            that a small violation is better than a large one.
        saving_bonus: reward per unit of unused budget ``1 - L / B`` when within budget:
            how much a saving is worth in accuracy. At the default 0.03 saving 40 % of the
            budget is worth 1.2 points of accuracy: enough to send a question that needs no
            expensive knob to a cheap configuration, not enough to give up answers for speed.
    """

    correct_weight: float = 1.0
    violation_penalty: float = 1.0
    overshoot_weight: float = 2.0
    saving_bonus: float = 0.03

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name}={value!r} is invalid: must be a finite number >= 0")
        if self.correct_weight == 0:
            raise ValueError("correct_weight=0 is invalid: must be > 0 (otherwise accuracy does not count)")


def _check_inputs(
    correct: torch.Tensor, latency_ms: torch.Tensor, budget_ms: torch.Tensor, allow_no_budget: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return (correct, latency, budget) as float tensors of one shape (N,) (``inf``: no budget)."""
    correct, latency, budget = (torch.as_tensor(x) for x in (correct, latency_ms, budget_ms))
    for name, x in (("correct", correct), ("latency_ms", latency), ("budget_ms", budget)):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(x.shape)}")
    if not (correct.shape == latency.shape == budget.shape):
        raise ValueError(
            f"shapes differ: correct {tuple(correct.shape)}, latency_ms {tuple(latency.shape)}, "
            f"budget_ms {tuple(budget.shape)}"
        )
    correct, latency, budget = correct.float(), latency.float(), budget.float()
    if bool(((correct < 0) | (correct > 1) | torch.isnan(correct)).any()):
        raise ValueError(f"correct must be booleans (or scores in [0, 1]), got {correct.tolist()[:8]}")
    bad = (torch.isnan(budget) | (budget <= 0)) if allow_no_budget else (~torch.isfinite(budget) | (budget <= 0))
    if bool(bad.any()):
        allowed = "> 0 (inf: no budget)" if allow_no_budget else "finite and > 0"
        raise ValueError(f"budget_ms must be {allowed}, got {budget[bad].tolist()[:5]}")
    bad = ~torch.isfinite(latency) | (latency < 0)
    if bool(bad.any()):
        raise ValueError(f"latency_ms must be finite and >= 0, got {latency[bad].tolist()[:5]}")
    # A budget as small as 1e-45 ms passes the checks above, but L / B overflows to inf
    # and the reward becomes NaN: refuse such pairs here, by name.
    bad = ~torch.isfinite(latency / budget) & torch.isfinite(budget)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"latency_ms / budget_ms is not finite at rows {rows} (latency_ms {latency[rows].tolist()}, "
            f"budget_ms {budget[rows].tolist()}): budgets must be large enough that the ratio stays finite"
        )
    return correct, latency, budget


def compute_reward(
    correct: torch.Tensor,
    latency_ms: torch.Tensor,
    budget_ms: torch.Tensor,
    cfg: RewardConfig | None = None,
    price: torch.Tensor | None = None,
    reference_ms: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward per rollout and its signed parts.

    Args:
        correct: (N,) bool, whether each answer is right.
        latency_ms: (N,) latency of each configuration served alone, >= 0.
        budget_ms: (N,) each request's budget, > 0; ``inf`` = no per-request budget.
        cfg: the weights (defaults: ``RewardConfig()``).
        price: (N,) latency prices lambda >= 0 (None: 0).
        reference_ms: the full configuration's latency, the unit of the price's latency
            (needed with a price).

    Returns:
        ``(reward (N,), parts)`` where ``parts`` holds (N,) tensors ``accuracy``,
        ``violation`` (the flat penalty, <= 0), ``overshoot`` (<= 0), ``saving`` (>= 0)
        and ``price`` (<= 0), and ``reward`` is their sum.
    """
    cfg = RewardConfig() if cfg is None else cfg
    correct, latency, budget = _check_inputs(correct, latency_ms, budget_ms, allow_no_budget=True)
    capped = torch.isfinite(budget).float()
    ratio = torch.where(capped.bool(), latency / budget, torch.zeros_like(latency))
    violated = (latency > budget).float()
    parts = {
        "accuracy": cfg.correct_weight * correct,
        "violation": -cfg.violation_penalty * violated,
        "overshoot": -cfg.overshoot_weight * (ratio - 1).clamp_min(0),
        "saving": cfg.saving_bonus * (1 - ratio) * (1 - violated) * capped,
        "price": torch.zeros_like(latency),
    }
    if price is not None:
        price = torch.as_tensor(price, dtype=torch.float32).reshape(-1)
        if price.shape != latency.shape or bool((~torch.isfinite(price) | (price < 0)).any()):
            raise ValueError(f"price must be (N,) = {tuple(latency.shape)}, finite and >= 0, got {price.tolist()[:5]}")
        if reference_ms is None or not (math.isfinite(reference_ms) and reference_ms > 0):
            raise ValueError(f"reference_ms={reference_ms!r} is invalid: a price needs the full configuration's latency > 0")
        parts["price"] = -price * latency / reference_ms
    reward = parts["accuracy"] + parts["violation"] + parts["overshoot"] + parts["saving"] + parts["price"]
    if not bool(torch.isfinite(reward).all()):
        # Weights and inputs are checked above; a huge finite ratio times a weight can still overflow.
        rows = (~torch.isfinite(reward)).nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"the reward is not finite at rows {rows} (latency_ms {latency[rows].tolist()}, budget_ms "
            f"{budget[rows].tolist()}): the latency is too many times the budget"
        )
    return reward, parts


def original_reward(
    correct: torch.Tensor,
    latency_ms: torch.Tensor,
    budget_ms: torch.Tensor,
    complexity: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The original implementation's reward, for comparison (docs/background.md)::

        acc - 0.5 sigmoid(10 (L/B - 1)) - 10 (max(0, L - B) / B)^2 - 0.05 complexity
            + 0.1 (1 - L/B) [L <= B]

    Args:
        correct, latency_ms, budget_ms: as in ``compute_reward``, (N,).
        complexity: (N,) in [0, 1], how much of the model the configuration runs.

    Returns:
        ``(reward (N,), parts)`` with signed (N,) parts ``accuracy``, ``soft_violation``
        (the sigmoid term, charged even under budget), ``overshoot``, ``complexity``,
        ``saving``; ``reward`` is their sum.
    """
    correct, latency, budget = _check_inputs(correct, latency_ms, budget_ms)
    complexity = torch.as_tensor(complexity).float()
    if complexity.shape != correct.shape:
        raise ValueError(f"complexity has shape {tuple(complexity.shape)}: expected {tuple(correct.shape)}")
    if bool(((complexity < 0) | (complexity > 1) | torch.isnan(complexity)).any()):
        raise ValueError(f"complexity must lie in [0, 1], got {complexity.tolist()[:8]}")
    ratio = latency / budget
    parts = {
        "accuracy": correct,
        "soft_violation": -0.5 * torch.sigmoid(10 * (ratio - 1)),
        "overshoot": -10 * (ratio - 1).clamp_min(0) ** 2,
        "complexity": -0.05 * complexity,
        "saving": 0.1 * (1 - ratio) * (latency <= budget).float(),
    }
    reward = sum(parts.values())
    return reward, parts
