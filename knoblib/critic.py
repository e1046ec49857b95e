"""A critic of configurations: how likely each configuration is to answer a question right.

The warm start's teacher (``--warm-start-teacher critic``). Per-sample correctness
(``knoblib.correctness``) says which of the 54 configurations answered each *training*
question right. A question's own row is one draw: ``count`` at 7 blocks is right 57-90 %
of the time, so whether it was right for this one image is mostly luck. The critic
smooths those draws over questions that read alike: a small MLP from the question's
language features (the controller's ``lang_feat``) to one logit per configuration, fitted
by binary cross-entropy to the correctness table.

Its predictions give every configuration an expected reward for any budget or price
(``knoblib.reward.compute_reward`` with the predicted probability as ``correct``), so the
best configuration for a request is exact: the budget guard decides what fits, and the
critic ranks what fits. The controller then learns to name that configuration
(``JointGRPOTrainer.fit_to_correctness(..., critic=)``), a classification with a clear
label at every budget, including the narrow windows where one configuration has just
started to fit (docs/findings.md: the expected-reward fit alone stays soft there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CorrectnessCritic(nn.Module):
    """P(configuration answers right | question), for every configuration of a knob space.

    Args:
        lang_dim: width of the language features (the VLM's d_model).
        num_configs: C, the configurations (columns in the order the caller uses).
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, lang_dim: int, num_configs: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(lang_dim), nn.Linear(lang_dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, num_configs)
        )

    def forward(self, lang_feat: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for language features (N, lang_dim)."""
        return self.net(lang_feat)

    @torch.no_grad()
    def predict(self, lang_feat: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, C) that each configuration answers right."""
        return torch.sigmoid(self(lang_feat))

    @classmethod
    def fit(
        cls,
        lang_feat: torch.Tensor,
        correct: torch.Tensor,
        steps: int = 1500,
        batch_size: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> "CorrectnessCritic":
        """A critic fitted to ``correct`` (N, C) bool or {0, 1} for questions with features ``lang_feat`` (N, lang_dim).

        Seeded (its own generator and initial weights); returns it in eval mode.
        """
        if lang_feat.dim() != 2 or correct.dim() != 2 or lang_feat.shape[0] != correct.shape[0]:
            raise ValueError(
                f"lang_feat {tuple(lang_feat.shape)} and correct {tuple(correct.shape)} must be (N, lang_dim) and (N, C)"
            )
        if lang_feat.shape[0] == 0 or steps < 1 or batch_size < 1:
            raise ValueError(f"the critic needs questions, steps >= 1 and batch_size >= 1 (got {lang_feat.shape[0]}, {steps}, {batch_size})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            critic = cls(lang_feat.shape[1], correct.shape[1])
        generator = torch.Generator().manual_seed(seed)
        target = correct.float()
        optimizer = torch.optim.Adam(critic.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            rows = torch.randint(0, lang_feat.shape[0], (batch_size,), generator=generator)
            loss = F.binary_cross_entropy_with_logits(critic(lang_feat[rows]), target[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return critic.eval()
