"""The budget guard: mask knob options whose profiled latency cannot fit the budget.

The controller's four choices are sampled one after another (tier, insertion position,
top-k, number of blocks). Given the choices already made and the latency table, the
guard tells which options of the next knob still leave at least one configuration
within the budget; the others are masked out of that knob's distribution (their
logits set to -inf), in sampling, in greedy decisions and in the log-probabilities
GRPO trains on. If no configuration fits a budget at all, the guard allows only the
fastest one.

Why: the lookup-table baseline reads the same latency table and never picks a
configuration that does not fit. A controller that has to *learn* the feasibility
boundary of every configuration from rewards alone violates budgets near that
boundary; with the guard it spends its learning on what the table cannot know, which
configuration answers *this* question best. Training without the guard
(``GRPOConfig.budget_guard=False``) is still available and the evaluation reports it.
"""

from __future__ import annotations

import torch

from .knobs import KnobSpace
from .latency import LatencyTable


class BudgetGuard:
    """Feasibility masks from a latency table.

    Attributes:
        grid: (T, P, K, NB) float64 latency in ms of (tier, p, top_k, blocks) by option
            index (``space.tiers``, ``insertion_positions``, ``top_k_options``,
            ``all_block_options``); +inf where the total is not allowed for p.
    """

    def __init__(self, table: LatencyTable, space: KnobSpace) -> None:
        table.check_space(space)
        self.space = space
        grid = torch.full(
            (len(space.tiers), len(space.insertion_positions), len(space.top_k_options), len(space.all_block_options)),
            float("inf"),
            dtype=torch.float64,
        )
        for knobs in space:
            grid[
                space.tiers.index(knobs.tier),
                space.insertion_positions.index(knobs.insertion_position),
                space.top_k_options.index(knobs.top_k),
                space.all_block_options.index(knobs.num_active_blocks),
            ] = table.latency(knobs)
        self.grid = grid
        self.fastest_ms = float(grid.min())

    def _fits(self, budgets: torch.Tensor) -> torch.Tensor:
        """(N, T, P, K, NB) bool; a budget nothing fits is raised to the fastest latency."""
        budgets = torch.as_tensor(budgets, dtype=torch.float64).cpu().clamp(min=self.fastest_ms)
        return self.grid[None] <= budgets[:, None, None, None, None]

    def tier_mask(self, budgets: torch.Tensor) -> torch.Tensor:
        """(N, T): tiers with at least one fitting configuration."""
        return self._fits(budgets).flatten(2).any(-1)

    def position_mask(self, budgets: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
        """(N, P): insertion positions that still fit, given each row's tier index."""
        fits = self._fits(budgets)[torch.arange(len(tier)), tier.cpu()]
        return fits.flatten(2).any(-1)

    def top_k_mask(self, budgets: torch.Tensor, tier: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(N, K): top-k options that still fit, given tier and position indices."""
        rows = torch.arange(len(tier))
        return self._fits(budgets)[rows, tier.cpu(), position.cpu()].any(-1)

    def blocks_mask(
        self, budgets: torch.Tensor, tier: torch.Tensor, position: torch.Tensor, top_k: torch.Tensor
    ) -> torch.Tensor:
        """(N, NB): block totals that fit, given tier, position and top-k indices."""
        rows = torch.arange(len(tier))
        return self._fits(budgets)[rows, tier.cpu(), position.cpu(), top_k.cpu()]
