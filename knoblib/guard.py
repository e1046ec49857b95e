"""The budget guard: which knob configurations can fit each request's budget.

The controller's four choices are made one after another (tier, insertion position,
top-k, number of blocks). The guard computes, once per request and up front, one
feasibility mask over the *joint* configuration space (from the latency table, a
latency quantile and the budget). Each choice then takes its slice of that mask: an
option is open when at least one configuration that extends the choices made so far
still fits (:func:`tier_options`, :func:`position_options`, :func:`top_k_options`,
:func:`block_options`). Closed options get logit -inf, in sampling, in greedy decisions
and in the log-probabilities GRPO trains on. If no configuration fits a budget at all,
only the fastest one is open.

Why a quantile and not the median: a budget is kept or broken by the wall clock of one
request, and a configuration whose *median* just fits breaks it half the time. The guard
reads each configuration's latency at ``quantile`` (``DEFAULT_QUANTILE``: p99 of this
machine's measured distribution), so a choice it allows fits the budget at least that
often. Why p99 and not p95: measured at p95, the configurations that sit right at a
budget broke it 5-7 % of the time on a shared 2-core machine (the decision's own time and
the machine's drift come on top); p99 keeps measured violations under 5 %.

Why a guard at all: the lookup-table baseline reads the same latency table and never
picks a configuration that does not fit. A controller that has to *learn* the
feasibility boundary of every configuration from rewards alone violates budgets near
that boundary; with the guard it spends its learning on what the table cannot know,
which configuration answers *this* question best. Training without the guard
(``GRPOConfig.budget_guard=False``) is still available.
"""

from __future__ import annotations

import torch

from .knobs import KnobSpace
from .latency import LatencyTable

DEFAULT_QUANTILE = 0.99


class BudgetGuard:
    """Feasibility masks from a latency table.

    Args:
        table: this machine's latency table.
        space: the model's knob space (checked against the table's).
        quantile: which latency quantile must fit the budget (one the table keeps).

    Attributes:
        grid: (T, P, K, NB) float64 latency in ms at ``quantile`` of (tier, p, top_k,
            blocks) by option index (``space.tiers``, ``insertion_positions``,
            ``top_k_options``, ``all_block_options``); +inf where the total is not
            allowed for p.
        fastest_ms: the smallest latency in ``grid``.
    """

    def __init__(self, table: LatencyTable, space: KnobSpace, quantile: float = DEFAULT_QUANTILE) -> None:
        table.check_space(space)
        missing = table.missing(space)
        if missing:
            raise ValueError(
                f"the latency table lacks {len(missing)} configurations of the knob space "
                f"(first: {missing[0].short()}): the guard needs every one"
            )
        self.space = space
        self.quantile = float(quantile)
        factor = table.factor(quantile)
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
            ] = table.latency(knobs) * factor
        self.grid = grid
        self.fastest_ms = float(grid.min())

    def mask(self, budgets_ms: torch.Tensor) -> torch.Tensor:
        """(N, T, P, K, NB) bool: the configurations that fit each budget (N,) in ms.

        A budget that nothing fits is raised to the fastest latency, so exactly the
        fastest configuration stays open.
        """
        budgets = torch.as_tensor(budgets_ms, dtype=torch.float64).cpu().reshape(-1).clamp(min=self.fastest_ms)
        return self.grid[None] <= budgets[:, None, None, None, None]

    def latency(self, tier: torch.Tensor, position: torch.Tensor, top_k: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """(N,) latency at the guard's quantile of the chosen option indices."""
        return self.grid[tier.cpu(), position.cpu(), top_k.cpu(), blocks.cpu()]


# --- the slices each choice takes (mask: (N, T, P, K, NB) bool) -----------------------
def tier_options(mask: torch.Tensor) -> torch.Tensor:
    """(N, T): tiers with at least one fitting configuration."""
    return mask.flatten(2).any(-1)


def position_options(mask: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """(N, P): insertion positions that still fit, given each row's tier index (N,)."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return mask[rows, tier.to(mask.device)].flatten(2).any(-1)


def top_k_options(mask: torch.Tensor, tier: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(N, K): top-k options that still fit, given tier and position indices (N,)."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return mask[rows, tier.to(mask.device), position.to(mask.device)].any(-1)


def block_options(mask: torch.Tensor, tier: torch.Tensor, position: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """(N, NB): block totals that fit, given tier, position and top-k indices (N,)."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return mask[rows, tier.to(mask.device), position.to(mask.device), top_k.to(mask.device)]


def open_mask(space: KnobSpace, n: int) -> torch.Tensor:
    """(n, T, P, K, NB) all-True: no budget constraint (block totals p forbids are masked by Stage 2 itself)."""
    shape = (n, len(space.tiers), len(space.insertion_positions), len(space.top_k_options), len(space.all_block_options))
    return torch.ones(shape, dtype=torch.bool)
