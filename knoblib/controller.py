"""The two-stage knob controller: Stage 1 picks (tier, p), Stage 2 picks (top_k, num_active_blocks).

* ``Knob1PredictorBudgetLanguage`` (Stage 1): ``lang_feat`` + ``budget_feat`` -> logits
  over tiers and insertion positions p = 1..P.
* ``Knob2Knob3Predictor`` (Stage 2), two input modes (the original system's names):

  - Mode B, ``use_optimized_mode=True``: ``lang_feat`` + ``budget_feat`` + an embedding of
    p. Every knob is known before the VLM runs, so a whole GRPO group runs as one batch.
  - Mode A, ``use_optimized_mode=False``: the *latency token* (the probe token's hidden
    state after block p-1, read from the frozen VLM) + the embedding of p.

  Its heads give logits over ``top_k_options`` and over ``all_block_options``; totals
  that p does not allow are masked to -inf, so they are never sampled nor chosen greedily.
* ``TwoStageController``: a transformers ``PreTrainedModel`` holding the budget encoder,
  the Mode-A budget probe and both stages; it samples, scores (log-probabilities and
  entropies for GRPO) and saves / loads with ``save_pretrained`` / ``from_pretrained``.

Decisions are carried as INDICES into the knob space's option lists (``Decisions``);
``Decisions.to_knobs`` turns them into ``KnobConfig`` values.

The original system numbers its knobs; knoblib names them (docs/background.md):

| original | knoblib |
|---|---|
| knob1a | ``tier`` |
| knob1b | ``insertion_position`` (p) |
| knob2 | ``top_k`` |
| knob3 | ``num_active_blocks`` |
| ``Knob1PredictorBudgetLanguage`` | Stage 1: (tier, insertion_position) |
| ``Knob2Knob3Predictor`` | Stage 2: (top_k, num_active_blocks) |
| ``get_knob3_options(p)`` / ``knob3_mask`` | the totals of ``num_active_blocks`` p allows |
| ``use_optimized_mode=True`` | Mode B |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .features import BudgetProbe, LatencyBudgetEncoder
from .guard import block_options, position_options, tier_options, top_k_options
from .knobs import KNOB_FIELDS as KNOB_NAMES, KnobConfig, KnobSpace


def _check_features(name: str, x: torch.Tensor | None, dim: int, rows: int | None = None) -> torch.Tensor:
    """Raise ValueError unless ``x`` is a float tensor (rows, dim); return it usable by autograd."""
    expected = f"({'N' if rows is None else rows}, {dim})"
    if x is None:
        raise ValueError(f"{name} is missing: expected a tensor {expected}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor {expected}, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim or (rows is not None and x.shape[0] != rows):
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected {expected}")
    if x.is_inference() and not torch.is_inference_mode_enabled():
        # Tensors made under torch.inference_mode (e.g. KnobVLM.generate's latency tokens)
        # cannot be saved for backward; a clone made outside inference mode can.
        x = x.clone()
    return x


# A controller's Stage-2 input: "A" reads the latency token, "B" the question, budget and p.
CONTROLLER_MODES = ("A", "B")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


def activation(name: str) -> nn.Module:
    """The hidden activation of the controller's MLPs.

    ``gelu_tanh`` (GELU's tanh approximation, the default) instead of exact GELU: at
    batch 1 on a CPU the exact one's erf costs about 4x as much, and the controller's
    decision must stay a small fraction of the cheapest request.
    """
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"hidden_act={name!r} is invalid: allowed {list(ACTIVATIONS)}")


def _like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` on ``weight``'s device and dtype (no call at all when it already is: batch-1 serving counts microseconds)."""
    if x.device != weight.device or x.dtype != weight.dtype:
        return x.to(weight.device, weight.dtype)
    return x


def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for the controller's layers (Linear, LayerNorm, activations, Sequential), called functionally.

    The same computation and the same autograd graph as ``module(x)``, without
    ``nn.Module.__call__``: at batch 1 on a CPU each module call costs more than the small
    matrix product inside it, and a Mode-B decision makes about 30 of them. (No hooks
    are used on the controller, which is what ``__call__`` would add.)
    """
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = apply(layer, x)
        return x
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if isinstance(module, nn.GELU):
        return F.gelu(x, approximate=module.approximate)
    if isinstance(module, nn.ReLU):
        return F.relu(x)
    return module(x)


class PolicyHead(nn.Linear):
    """A linear layer that outputs logits; ``TwoStageController`` initialises it near zero."""


class Knob1PredictorBudgetLanguage(nn.Module):
    """Stage 1: (tier, insertion position) logits from the question and the budget.

    The original system's name: it predicts knob 1 (knob1a = ``tier``, knob1b =
    ``insertion_position``) from the budget and the language features.

    Args:
        lang_dim: width of ``lang_feat`` (the VLM's d_model).
        budget_dim: width of ``budget_feat``.
        hidden_dim: width of the MLP trunk.
        num_tiers: number of vision tiers.
        num_insertion_positions: P, the number of insertion positions (p = 1..P).
    """

    def __init__(
        self,
        lang_dim: int,
        budget_dim: int,
        hidden_dim: int,
        num_tiers: int,
        num_insertion_positions: int,
        hidden_act: str = "gelu_tanh",
    ) -> None:
        super().__init__()
        self.lang_dim, self.budget_dim = lang_dim, budget_dim
        # The embedding table's scale depends on the VLM; normalising makes Stage 1 indifferent to it.
        self.lang_norm = nn.LayerNorm(lang_dim)
        self.trunk = nn.Sequential(
            nn.Linear(lang_dim + budget_dim, hidden_dim),
            activation(hidden_act),
            nn.Linear(hidden_dim, hidden_dim),
            activation(hidden_act),
        )
        self.tier_head = PolicyHead(hidden_dim, num_tiers)
        self.insertion_head = PolicyHead(hidden_dim, num_insertion_positions)

    def forward(self, lang_feat: torch.Tensor, budget_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lang_feat (N, lang_dim), budget_feat (N, budget_dim)) -> (tier logits (N, T), position logits (N, P))."""
        lang_feat = _check_features("lang_feat", lang_feat, self.lang_dim)
        budget_feat = _check_features("budget_feat", budget_feat, self.budget_dim, lang_feat.shape[0])
        weight = self.tier_head.weight
        lang_feat, budget_feat = _like(lang_feat, weight), _like(budget_feat, weight)
        hidden = apply(self.trunk, torch.cat([apply(self.lang_norm, lang_feat), budget_feat], dim=-1))
        return apply(self.tier_head, hidden), apply(self.insertion_head, hidden)


class Knob2Knob3Predictor(nn.Module):
    """Stage 2: (top_k, num_active_blocks) logits for rows whose insertion position p is known.

    The original system's name: knob 2 is ``top_k``, knob 3 ``num_active_blocks``.

    Args:
        use_optimized_mode: True for Mode B (``lang_feat`` + ``budget_feat`` + embedding(p)),
            False for Mode A (the latency token + embedding(p)).
        lang_dim, budget_dim: widths of ``lang_feat`` and ``budget_feat`` (Mode B).
        latency_dim: width of the latency token, the VLM's hidden size (Mode A).
        hidden_dim: width of the projections and the fusion MLP.
        max_insertion_position: P.
        top_k_options: the top_k values, one logit each.
        block_options: p -> the ``num_active_blocks`` totals allowed for p, for p = 1..P.
        hidden_act: the MLP activation (``ACTIVATIONS``).
        vision_dim: Mode B only: width of ``vision_feat``, statistics of the vision features
            at the chosen tier (``knoblib.vision_features``); 0 (the default) = none.
    """

    def __init__(
        self,
        use_optimized_mode: bool = True,
        *,
        lang_dim: int,
        budget_dim: int,
        latency_dim: int,
        hidden_dim: int,
        max_insertion_position: int,
        top_k_options: Sequence[int],
        block_options: dict[int, Sequence[int]],
        hidden_act: str = "gelu_tanh",
        vision_dim: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(vision_dim, bool) or not isinstance(vision_dim, int) or vision_dim < 0:
            raise ValueError(f"vision_dim={vision_dim!r} is invalid: must be an int >= 0 (0 = no vision statistics)")
        if vision_dim and not use_optimized_mode:
            raise ValueError(f"vision_dim={vision_dim} needs Mode B: Mode A sees the image through the latency token")
        if sorted(block_options) != list(range(1, max_insertion_position + 1)):
            raise ValueError(
                f"block_options has keys {sorted(block_options)}: expected p = 1..{max_insertion_position}"
            )
        self.use_optimized_mode = bool(use_optimized_mode)
        self.lang_dim, self.budget_dim, self.latency_dim = lang_dim, budget_dim, latency_dim
        self.vision_dim = vision_dim
        self.max_insertion_position = max_insertion_position
        self.top_k_options = tuple(int(k) for k in top_k_options)
        self.block_options = {int(p): tuple(int(n) for n in opts) for p, opts in block_options.items()}
        self.all_block_options = tuple(sorted({n for opts in self.block_options.values() for n in opts}))
        # Row p-1: which of all_block_options p allows. A plain tensor per device, not a
        # buffer: transformers' from_pretrained leaves non-persistent buffers uninitialised.
        self._mask_table = [
            [n in self.block_options[p] for n in self.all_block_options] for p in range(1, max_insertion_position + 1)
        ]
        self._mask_cache: dict[torch.device, torch.Tensor] = {}

        self.insertion_embedding = nn.Embedding(max_insertion_position, hidden_dim)
        if self.use_optimized_mode:
            self.lang_proj = nn.Sequential(nn.LayerNorm(lang_dim), nn.Linear(lang_dim, hidden_dim))
            self.budget_proj = nn.Linear(budget_dim, hidden_dim)
            fused_inputs = 3
        else:
            # The residual stream's scale grows with depth, so the token is normalised first.
            self.latency_norm = nn.LayerNorm(latency_dim)
            self.latency_token_proj = nn.Linear(latency_dim, hidden_dim)
            fused_inputs = 2
        if vision_dim:
            # Statistics of image features have their own scale: normalised first, like the question's.
            self.vision_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden_dim))
            fused_inputs += 1
        self.fusion = nn.Sequential(
            activation(hidden_act),
            nn.Linear(fused_inputs * hidden_dim, hidden_dim),
            activation(hidden_act),
        )
        self.top_k_head = PolicyHead(hidden_dim, len(self.top_k_options))
        self.block_head = PolicyHead(hidden_dim, len(self.all_block_options))

    @property
    def mode(self) -> str:
        return "B" if self.use_optimized_mode else "A"

    def get_knob3_options(self, insertion_position: int) -> tuple[int, ...]:
        """The ``num_active_blocks`` totals allowed for insertion position p (1-based)."""
        if insertion_position not in self.block_options:
            raise ValueError(
                f"insertion_position={insertion_position!r} is invalid: allowed 1..{self.max_insertion_position}"
            )
        return self.block_options[insertion_position]

    def _check_positions(self, insertion_positions: torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(insertion_positions)
        if p.dim() != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
            raise ValueError(
                f"insertion_position must be a 1-D integer tensor (N,) of p values, got "
                f"shape {tuple(p.shape)} dtype {p.dtype}"
            )
        bad = (p < 1) | (p > self.max_insertion_position)
        if bool(bad.any()):
            raise ValueError(
                f"insertion_position has values {p[bad].tolist()[:5]}: allowed 1..{self.max_insertion_position}"
            )
        return p.long()

    def p_mask(self, device: torch.device) -> torch.Tensor:
        """(P, NB) bool on ``device``: row p-1 says which of ``all_block_options`` p allows."""
        if device not in self._mask_cache:
            self._mask_cache[device] = torch.tensor(self._mask_table, dtype=torch.bool, device=device)
        return self._mask_cache[device]

    def knob3_mask(self, insertion_positions: torch.Tensor) -> torch.Tensor:
        """(N,) p values (1-based) -> bool (N, len(all_block_options)), True where the total is allowed."""
        p = self._check_positions(insertion_positions)
        return self.p_mask(p.device)[p - 1]

    def forward(
        self,
        insertion_position: torch.Tensor,
        lang_feat: torch.Tensor | None = None,
        budget_feat: torch.Tensor | None = None,
        latency_token: torch.Tensor | None = None,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (top_k logits (N, K), block logits (N, NB) with disallowed totals at -inf).

        Args:
            insertion_position: (N,) p values, 1-based.
            lang_feat: (N, lang_dim), Mode B only.
            budget_feat: (N, budget_dim), Mode B only.
            latency_token: (N, latency_dim), Mode A only.
            vision_feat: (N, vision_dim), Mode B with ``vision_dim > 0`` only.
        """
        p = self._check_positions(insertion_position)
        n = p.shape[0]
        weight = self.top_k_head.weight
        p = p.to(weight.device)
        if self.use_optimized_mode:
            if latency_token is not None:
                raise ValueError(
                    "Mode B (use_optimized_mode=True) does not use latency_token: pass lang_feat and budget_feat"
                )
            if lang_feat is None or budget_feat is None:
                missing = [name for name, x in (("lang_feat", lang_feat), ("budget_feat", budget_feat)) if x is None]
                raise ValueError(f"Mode B (use_optimized_mode=True) needs lang_feat and budget_feat: missing {missing}")
            lang_feat = _check_features("lang_feat", lang_feat, self.lang_dim, n)
            budget_feat = _check_features("budget_feat", budget_feat, self.budget_dim, n)
            parts = [
                apply(self.lang_proj, _like(lang_feat, weight)),
                apply(self.budget_proj, _like(budget_feat, weight)),
                self.insertion_embedding.weight[p - 1],
            ]
            if self.vision_dim:
                if vision_feat is None:
                    raise ValueError(
                        f"this Stage 2 reads vision statistics: pass vision_feat ({n}, {self.vision_dim}) of the chosen tier"
                    )
                vision_feat = _check_features("vision_feat", vision_feat, self.vision_dim, n)
                # Last, after the p embedding: the fused layer's first columns stay those of plain Mode B.
                parts.append(apply(self.vision_proj, _like(vision_feat, weight)))
            elif vision_feat is not None:
                raise ValueError("this Stage 2 has no vision input (vision_dim=0): do not pass vision_feat")
        else:
            if vision_feat is not None:
                raise ValueError("Mode A (use_optimized_mode=False) sees the image through the latency token: do not pass vision_feat")
            if lang_feat is not None or budget_feat is not None:
                raise ValueError(
                    "Mode A (use_optimized_mode=False) uses only latency_token (+ the p embedding): "
                    "do not pass lang_feat / budget_feat"
                )
            if latency_token is None:
                raise ValueError(
                    f"Mode A (use_optimized_mode=False) needs latency_token ({n}, {self.latency_dim}): "
                    "the probe's hidden state after block p-1"
                )
            latency_token = _check_features("latency_token", latency_token, self.latency_dim, n)
            parts = [
                apply(self.latency_token_proj, apply(self.latency_norm, _like(latency_token, weight))),
                self.insertion_embedding.weight[p - 1],
            ]
        hidden = apply(self.fusion, torch.cat(parts, dim=-1))
        block_logits = apply(self.block_head, hidden).masked_fill(~self.p_mask(p.device)[p - 1], float("-inf"))
        return apply(self.top_k_head, hidden), block_logits


# --------------------------------------------------------------------------
# Decisions: four index tensors
# --------------------------------------------------------------------------


@dataclass
class Decisions:
    """The four choices for N rows, as indices into the knob space's option lists.

    Attributes:
        tier: (N,) index into ``space.tiers``.
        insertion_position: (N,) index into ``space.insertion_positions``, i.e. p - 1.
        top_k: (N,) index into ``space.top_k_options``.
        num_active_blocks: (N,) index into ``space.all_block_options``.
    """

    tier: torch.Tensor
    insertion_position: torch.Tensor
    top_k: torch.Tensor
    num_active_blocks: torch.Tensor

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != torch.long:
                if isinstance(value, torch.Tensor):
                    got = f"shape {tuple(value.shape)} dtype {value.dtype}"
                else:
                    got = type(value).__name__
                raise ValueError(f"Decisions.{f.name} must be a 1-D LongTensor (N,), got {got}")
            if n is not None and value.shape[0] != n:
                raise ValueError(f"Decisions.{f.name} has {value.shape[0]} rows: expected {n} like tier")
            n = value.shape[0]

    def __len__(self) -> int:
        return self.tier.shape[0]

    def index(self, rows) -> "Decisions":
        """The decisions of the given rows (an index, slice, list or bool mask)."""
        return Decisions(*(getattr(self, f.name)[rows].reshape(-1) for f in fields(self)))

    def to(self, device: torch.device | str) -> "Decisions":
        return Decisions(*(getattr(self, f.name).to(device) for f in fields(self)))

    def check(self, space: KnobSpace) -> None:
        """Raise ValueError if an index is out of range or a total is not allowed for its p."""
        sizes = {
            "tier": len(space.tiers),
            "insertion_position": len(space.insertion_positions),
            "top_k": len(space.top_k_options),
            "num_active_blocks": len(space.all_block_options),
        }
        for name, size in sizes.items():
            value = getattr(self, name)
            bad = (value < 0) | (value >= size)
            if bool(bad.any()):
                raise ValueError(f"Decisions.{name} has indices {value[bad].tolist()[:5]}: allowed 0..{size - 1}")
        for row, (pos, blocks) in enumerate(zip(self.insertion_position.tolist(), self.num_active_blocks.tolist())):
            p, total = space.insertion_positions[pos], space.all_block_options[blocks]
            if total not in space.block_options(p):
                raise ValueError(
                    f"row {row}: num_active_blocks={total} is not allowed for insertion_position={p}: "
                    f"allowed {list(space.block_options(p))}"
                )

    def to_knobs(self, space: KnobSpace) -> list[KnobConfig]:
        """One validated ``KnobConfig`` per row."""
        self.check(space)
        return [
            space.validate(
                KnobConfig(
                    space.tiers[t], space.insertion_positions[p], space.top_k_options[k], space.all_block_options[b]
                )
            )
            for t, p, k, b in zip(*(getattr(self, name).tolist() for name in KNOB_NAMES))
        ]

    @classmethod
    def from_knobs(cls, knobs: Sequence[KnobConfig], space: KnobSpace) -> "Decisions":
        """Indices of validated ``KnobConfig`` values (raises ValueError for an invalid one)."""
        rows = [space.validate(k) for k in knobs]
        if not rows:
            raise ValueError("knobs is empty: give at least one KnobConfig")
        return cls(
            torch.tensor([space.tiers.index(k.tier) for k in rows]),
            torch.tensor([space.insertion_positions.index(k.insertion_position) for k in rows]),
            torch.tensor([space.top_k_options.index(k.top_k) for k in rows]),
            torch.tensor([space.all_block_options.index(k.num_active_blocks) for k in rows]),
        )


# --------------------------------------------------------------------------
# The transformers model
# --------------------------------------------------------------------------


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")


class ControllerConfig(PretrainedConfig):
    """Everything needed to rebuild a ``TwoStageController`` (saved as config.json).

    transformers 5 configs are dataclasses: fields are declared below and checked in
    ``__post_init__``.

    Attributes:
        mode: "B" (Stage 2 from lang_feat + budget_feat + p, the original system's optimisation) or
            "A" (Stage 2 from the latency token + p).
        knob_space: the knob space as a dict (``KnobSpace.as_dict()``: num_layers,
            default_top_k, max_insertion_position, max_dropped_blocks, tiers); default
            ``KnobSpace.for_model(16, 8)``.
        lang_dim: width of ``lang_feat`` (the VLM's d_model).
        latency_dim: width of the latency token and the probe (the VLM's hidden size).
        budget_range: (lo, hi) the budgets the controller is trained on, as fractions of
            the full configuration's latency on the machine that serves
            (``LatencyTable.relative``); sets the normalisation, and budgets outside it
            are saturated to its edges.
        num_frequencies: sin/cos pairs in the budget encoding.
        hidden_dim: width of every hidden layer.
        budget_dim: width of ``budget_feat``.
        probe_scale: norm of the Mode-A probe embedding (the VLM's mean token-embedding norm).
        seed: seeds the initial weights and the fixed probe projection.
        budget_guard: whether the controller is trained and served with the budget
            guard (``knoblib.guard``: options whose profiled latency cannot fit are masked).
        hidden_act: the MLPs' activation (``ACTIVATIONS``; ``gelu_tanh`` by default).
        max_price: the largest latency price lambda the controller is trained on (its
            budget encoder then also reads the price; ``knoblib.reward``); 0 = per-request
            budgets only.
        use_question: False makes the budget-only ablation: the stages see zeros instead
            of ``lang_feat``, so they can condition on the budget and price alone.
        vision_stats: Mode B only: Stage 2 also reads ``vision_feat``, the mean and std over
            the image tokens of the projector output at the tier Stage 1 chose
            (``knoblib.vision_features``; width 2 x ``lang_dim``). The vision tower runs
            before the language model anyway, so no language-model block runs first.
        hybrid: Mode B only: the controller also holds a Mode-A Stage 2 (``stage2_a``,
            reading the latency token) beside its Mode-B one (``stage2``), with one Stage 1.
            It serves either way, chosen per call (``served_as``).
        distilled_from: recorded only (it changes nothing the controller computes): the
            Mode-A teacher it was distilled from (``GRPOConfig.distill_from``), or "".
    """

    model_type = "knoblib_controller"

    mode: str = "B"
    knob_space: dict | None = None
    lang_dim: int = 64
    latency_dim: int = 64
    budget_range: tuple[float, float] | list[float] = (0.5, 1.1)
    num_frequencies: int = 6
    hidden_dim: int = 64
    budget_dim: int = 64
    probe_scale: float = 1.0
    seed: int = 0
    budget_guard: bool = True
    hidden_act: str = "gelu_tanh"
    max_price: float = 0.0
    use_question: bool = True
    vision_stats: bool = False
    hybrid: bool = False
    distilled_from: str = ""

    def __post_init__(self, **kwargs) -> None:
        if "budget_range_ms" in kwargs:
            raise ValueError(
                f"budget_range_ms={kwargs['budget_range_ms']!r}: this controller was saved by an older knoblib that fed "
                "it budgets in milliseconds of one machine; retrain it (python -m knoblib train), or set "
                "budget_range = budget_range_ms / (the full configuration's latency on the training machine)"
            )
        if self.mode not in CONTROLLER_MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: allowed 'A' (latency token) or 'B' (optimised)")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is invalid: allowed {list(ACTIVATIONS)}")
        if isinstance(self.max_price, bool) or not isinstance(self.max_price, (int, float)) or not (
            math.isfinite(self.max_price) and self.max_price >= 0
        ):
            raise ValueError(f"max_price={self.max_price!r} is invalid: must be a finite number >= 0")
        self.max_price = float(self.max_price)
        if not isinstance(self.use_question, bool):
            raise ValueError(f"use_question={self.use_question!r} is invalid: must be True or False")
        for name in ("vision_stats", "hybrid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be True or False")
            if getattr(self, name) and self.mode != "B":
                raise ValueError(f"{name}=True needs mode 'B' (got mode={self.mode!r}): it extends the Mode-B Stage 2")
        if self.vision_stats and self.hybrid:
            raise ValueError("vision_stats=True and hybrid=True are separate variants: choose one")
        if not isinstance(self.distilled_from, str):
            raise ValueError(f"distilled_from={self.distilled_from!r} is invalid: a teacher folder (str) or ''")
        if self.knob_space is None:
            self.knob_space = KnobSpace.for_model().as_dict()
        elif isinstance(self.knob_space, KnobSpace):
            self.knob_space = self.knob_space.as_dict()
        if not isinstance(self.knob_space, dict):
            raise ValueError(f"knob_space={self.knob_space!r} is invalid: expected KnobSpace.as_dict()")
        try:
            space = _space_from_dict(self.knob_space)
        except (TypeError, ValueError) as err:
            raise ValueError(f"knob_space={self.knob_space!r} is invalid: {err}") from err
        self.knob_space = space.as_dict()
        for name in ("lang_dim", "latency_dim", "num_frequencies", "hidden_dim", "budget_dim"):
            _positive_int(name, getattr(self, name))
        try:
            lo, hi = (float(x) for x in self.budget_range)
        except (TypeError, ValueError) as err:
            raise ValueError(f"budget_range={self.budget_range!r} is invalid: expected (lo, hi)") from err
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise ValueError(f"budget_range={self.budget_range!r} is invalid: need finite 0 <= lo < hi")
        self.budget_range = (lo, hi)
        if isinstance(self.probe_scale, bool) or not isinstance(self.probe_scale, (int, float)) or not (
            math.isfinite(self.probe_scale) and self.probe_scale > 0
        ):
            raise ValueError(f"probe_scale={self.probe_scale!r} is invalid: must be finite and > 0")
        self.probe_scale = float(self.probe_scale)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is invalid: must be an int >= 0")
        super().__post_init__(**kwargs)

    def get_knob_space(self) -> KnobSpace:
        """The knob space as a ``KnobSpace``."""
        return _space_from_dict(self.knob_space)

    @classmethod
    def for_vlm(cls, vlm, budget_range: tuple[float, float], mode: str = "B", **kwargs) -> "ControllerConfig":
        """A config matching a ``KnobVLM``: its knob space, widths and token-embedding norm.

        ``budget_range``: relative budgets (fractions of the full configuration's latency),
        e.g. ``BudgetSampler(table).relative_range``.
        """
        from .features import LanguageFeatureExtractor

        return cls(
            mode=mode,
            knob_space=vlm.knob_space.as_dict(),
            lang_dim=vlm.hidden_size,
            latency_dim=vlm.hidden_size,
            budget_range=tuple(budget_range),
            probe_scale=LanguageFeatureExtractor.from_vlm(vlm).mean_embedding_norm(),
            **kwargs,
        )


def _space_from_dict(space: dict) -> KnobSpace:
    space = dict(space)
    if "tiers" in space:
        space["tiers"] = tuple(space["tiers"])
    return KnobSpace(**space)


def _mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with the options ``allowed`` (N, K) bool excludes set to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def _draw(logits: torch.Tensor, generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """(N,) choices from masked logits (N, K): the argmax, or a draw from ``generator`` (global RNG if None)."""
    if greedy:
        # Masked options sit at -inf, so argmax never returns one.
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # A generator draws only on its own device (e.g. a CPU generator for a CUDA
        # controller): sample there, return the indices on the controller's device.
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _at_tier(vision_feat: torch.Tensor | None, tier_idx: torch.Tensor, num_tiers: int, width: int) -> torch.Tensor:
    """Each row's vision statistics at its chosen tier: (N, T, width) -> (N, width)."""
    n = tier_idx.shape[0]
    if vision_feat is None or tuple(vision_feat.shape) != (n, num_tiers, width):
        got = None if vision_feat is None else tuple(vision_feat.shape)
        raise ValueError(
            f"vision_feat has shape {got}: expected ({n}, {num_tiers}, {width}), the vision statistics at every tier "
            "(knoblib.vision_features.vision_statistics_all_tiers)"
        )
    return vision_feat[torch.arange(n, device=vision_feat.device), tier_idx.to(vision_feat.device)]


class TwoStageController(PreTrainedModel):
    """The two-stage knob controller as a transformers model.

    Modules: ``budget_encoder`` (``LatencyBudgetEncoder``), ``budget_probe``
    (``BudgetProbe``, the fixed Mode-A probe), ``stage1``
    (``Knob1PredictorBudgetLanguage``), ``stage2`` (``Knob2Knob3Predictor`` in the
    config's mode). Every method is batched over N rows.

    Save with ``save_pretrained(dir)``; load with ``TwoStageController.from_pretrained(dir)``
    or, checking the checkpoint against the caller's VLM, ``TwoStageController.load(dir, ...)``.
    """

    config_class = ControllerConfig
    base_model_prefix = "controller"
    main_input_name = "lang_feat"
    # A few hundred kB: never split across devices.
    _no_split_modules: list[str] = []

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__(config)
        space = config.get_knob_space()
        # Seeded construction without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.budget_encoder = LatencyBudgetEncoder(
                config.budget_range,
                config.num_frequencies,
                config.hidden_dim,
                config.budget_dim,
                config.hidden_act,
                config.max_price,
            )
            self.budget_probe = BudgetProbe(
                self.budget_encoder.encoding_dim, config.latency_dim, seed=config.seed, scale=config.probe_scale
            )
            self.stage1 = Knob1PredictorBudgetLanguage(
                config.lang_dim,
                config.budget_dim,
                config.hidden_dim,
                len(space.tiers),
                space.max_insertion_position,
                config.hidden_act,
            )
            def stage2_head(mode_b: bool, vision_dim: int = 0) -> Knob2Knob3Predictor:
                return Knob2Knob3Predictor(
                    use_optimized_mode=mode_b,
                    lang_dim=config.lang_dim,
                    budget_dim=config.budget_dim,
                    latency_dim=config.latency_dim,
                    hidden_dim=config.hidden_dim,
                    max_insertion_position=space.max_insertion_position,
                    top_k_options=space.top_k_options,
                    block_options={p: space.block_options(p) for p in space.insertion_positions},
                    hidden_act=config.hidden_act,
                    vision_dim=vision_dim,
                )

            self.stage2 = stage2_head(config.mode == "B", 2 * config.lang_dim if config.vision_stats else 0)
            if config.hybrid:
                # The hybrid's second Stage 2: Mode A, on the latency token (``served_as("A")``).
                self.stage2_a = stage2_head(False)
            self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Called by transformers for every module not loaded from a checkpoint."""
        if isinstance(module, PolicyHead):
            # Near-zero logits: the untrained policy is almost uniform, so GRPO's first
            # groups explore every knob value.
            init.normal_(module.weight, mean=0.0, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            # PyTorch's defaults (transformers' 0.02-std normal would shrink the small MLPs' signal).
            module.reset_parameters()
        elif isinstance(module, BudgetProbe):
            init.copy_(module.projection, module.seeded_projection())

    # --- saving and loading -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "TwoStageController":
        """Load a controller folder written by ``save_pretrained`` (local folders only)."""
        path = Path(pretrained_model_name_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no controller at {path}: {'config.json is missing' if path.is_dir() else 'no such folder'} "
                "(write one with TwoStageController.save_pretrained)"
            )
        cls._check_weights_match_config(path)
        return super().from_pretrained(str(path), *args, **kwargs)

    @classmethod
    def _check_weights_match_config(cls, path: Path) -> None:
        """``ValueError`` naming the folder and each tensor where config.json and model.safetensors disagree.

        transformers would print a load report and raise a ``RuntimeError`` without the
        folder's name, or silently re-initialise what is missing.
        """
        from .vlm import safetensors_shapes

        saved = safetensors_shapes(path / "model.safetensors")
        try:
            config = ControllerConfig.from_pretrained(str(path))
        except (OSError, TypeError, ValueError) as err:
            raise ValueError(f"{path / 'config.json'} is not a valid controller config: {err}") from err
        expected = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
        problems = [f"{name}: config.json gives {expected[name]}, model.safetensors holds {saved[name]}"
                    for name in sorted(set(saved) & set(expected)) if saved[name] != expected[name]]
        problems += [f"{name}: missing from model.safetensors" for name in sorted(set(expected) - set(saved))]
        problems += [f"{name}: in model.safetensors but not in a model of config.json" for name in sorted(set(saved) - set(expected))]
        if problems:
            fields = "lang_dim, latency_dim, hidden_dim, budget_dim, num_frequencies, knob_space"
            raise ValueError(
                f"controller at {path}: config.json and model.safetensors disagree ({len(problems)} tensors; "
                f"check {fields}): " + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            )

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_space: KnobSpace | None = None,
        expected_mode: str | None = None,
        expected_latency_dim: int | None = None,
    ) -> "TwoStageController":
        """``from_pretrained`` that first checks the checkpoint matches the caller's setup.

        Raises FileNotFoundError for a missing folder, and ValueError ("checkpoint from
        another configuration") when its knob space, mode or latency_dim differs from the
        expected one (typically ``vlm.knob_space``, the mode being trained, ``vlm.hidden_size``).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no controller at {path}: config.json is missing")
        config = ControllerConfig.from_pretrained(str(path))
        saved_space = config.get_knob_space()
        mismatches = []
        if expected_space is not None and saved_space != expected_space:
            mismatches.append(f"knob_space {saved_space} != expected {expected_space}")
        if expected_mode is not None and config.mode != expected_mode:
            mismatches.append(f"mode {config.mode!r} != expected {expected_mode!r}")
        if expected_latency_dim is not None and config.latency_dim != expected_latency_dim:
            mismatches.append(f"latency_dim {config.latency_dim} != expected {expected_latency_dim}")
        if mismatches:
            raise ValueError(f"checkpoint from another configuration at {path}: " + "; ".join(mismatches))
        return cls.from_pretrained(path)

    # --- properties ---------------------------------------------------------------
    @property
    def knob_space(self) -> KnobSpace:
        return self.config.get_knob_space()

    @property
    def mode(self) -> str:
        return self.config.mode

    def served_as(self, mode: str) -> "TwoStageController":
        """A hybrid controller (``config.hybrid``) as a plain controller of ``mode`` ("A" or "B").

        The result has this controller's budget encoder, probe and Stage 1, and as its
        ``stage2`` the Mode-B head (``stage2``) or the Mode-A head (``stage2_a``), with a
        config of that mode. It is a *view*: every parameter is shared (training the view
        trains this controller), so every path that takes a plain controller
        (``run_controller``, ``ModeADecider``, ``GreedyDecider``, the evaluation) serves the
        hybrid either way. ``save_pretrained`` on a view writes a plain controller of that
        mode. Its ``hybrid_view`` attribute says which way it serves ("A" or "B"), and
        ``hybrid_source`` is this controller.
        A non-hybrid controller is returned as it is for its own mode.
        """
        if mode not in ("A", "B"):
            raise ValueError(f"mode={mode!r} is invalid: allowed 'A' or 'B'")
        if not self.config.hybrid:
            if mode == self.mode:
                return self
            raise ValueError(f"this is a Mode-{self.mode} controller, not a hybrid: it cannot serve in Mode {mode}")
        import copy

        view = self.__class__.__new__(self.__class__)
        view.__dict__.update(self.__dict__)
        # Own module table (the parameters inside stay shared): stage2 is the chosen head.
        view._modules = {name: module for name, module in self._modules.items() if name != "stage2_a"}
        view._modules["stage2"] = self._modules["stage2" if mode == "B" else "stage2_a"]
        view.config = copy.deepcopy(self.config)
        view.config.mode, view.config.hybrid = mode, False
        view.hybrid_view = mode
        # The whole hybrid, for training it (not a submodule: the view's weights are its own modules).
        object.__setattr__(view, "hybrid_source", self)
        return view

    # --- features ---------------------------------------------------------------
    def encode_budget(
        self, budget_ratio: torch.Tensor | Sequence[float], price: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """``budget_feat`` (N, budget_dim) for budgets (N,) relative to the full configuration's
        latency on the serving machine (``LatencyTable.relative``; ``inf``: no budget) and
        latency prices (N,) (None: 0), with gradients into the encoder."""
        return self.budget_encoder(budget_ratio, price)

    @torch.no_grad()
    def probe_embeddings(
        self, budget_ratio: torch.Tensor | Sequence[float], price: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """Mode-A probe input embeddings (N, latency_dim) for relative budgets (N,) and prices (N,)."""
        return self.budget_probe(self.budget_encoder.sinusoidal(budget_ratio, price))

    def _question(self, lang_feat: torch.Tensor | None) -> torch.Tensor | None:
        """``lang_feat``, or zeros for the budget-only ablation (``config.use_question=False``)."""
        if lang_feat is None or self.config.use_question:
            return lang_feat
        return torch.zeros_like(lang_feat)

    # --- logits and distributions ---------------------------------------------------
    # ``mask`` below is the budget guard's joint feasibility mask (N, T, P, K, NB) bool
    # (``BudgetGuard.mask``; None = every option open). Each choice takes its slice of it,
    # given the choices already made (``knoblib.guard.tier_options`` and friends).
    def stage1_logits(
        self, lang_feat: torch.Tensor, budget_feat: torch.Tensor, mask: torch.Tensor | None = None,
        tier_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tier logits (N, T), position logits (N, P)), closed options at -inf.

        The position's slice of ``mask`` depends on the row's tier: pass ``tier_idx`` (N,)
        once the tier is chosen (without it, positions are not masked).
        """
        tier_logits, position_logits = self.stage1(self._question(lang_feat), budget_feat)
        if mask is not None:
            tier_logits = _mask(tier_logits, tier_options(mask))
            if tier_idx is not None:
                position_logits = _mask(position_logits, position_options(mask, tier_idx))
        return tier_logits, position_logits

    def _positions(self, insertion_position_idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(insertion_position_idx)
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(
                "insertion_position_idx must be a 1-D integer tensor (N,), "
                f"got shape {tuple(idx.shape)} dtype {idx.dtype}"
            )
        size = self.knob_space.max_insertion_position
        bad = (idx < 0) | (idx >= size)
        if bool(bad.any()):
            raise ValueError(
                f"insertion_position_idx has values {idx[bad].tolist()[:5]}: allowed 0..{size - 1} (p - 1)"
            )
        return idx.long() + 1

    def stage2_logits(
        self,
        insertion_position_idx: torch.Tensor,
        lang_feat: torch.Tensor | None = None,
        budget_feat: torch.Tensor | None = None,
        latency_token: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        tier_idx: torch.Tensor | None = None,
        top_k_idx: torch.Tensor | None = None,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k logits (N, K), block logits (N, NB)): totals p forbids and closed options at -inf.

        Mode B reads ``lang_feat`` and ``budget_feat`` (and, with ``config.vision_stats``,
        ``vision_feat`` (N, 2 lang_dim) at each row's tier), Mode A reads ``latency_token``
        (N, latency_dim); inputs the mode does not use are ignored. With a ``mask``
        (and ``tier_idx``), options that cannot fit are closed; the blocks' slice depends
        on the top-k, so pass ``top_k_idx`` once it is chosen.
        """
        p = self._positions(insertion_position_idx)
        if self.stage2.use_optimized_mode:
            top_k_logits, block_logits = self.stage2(
                p, lang_feat=self._question(lang_feat), budget_feat=budget_feat,
                vision_feat=vision_feat if self.stage2.vision_dim else None,
            )
        else:
            top_k_logits, block_logits = self.stage2(p, latency_token=latency_token)
        if mask is not None:
            position_idx = p - 1
            top_k_logits = _mask(top_k_logits, top_k_options(mask, tier_idx, position_idx))
            if top_k_idx is not None:
                block_logits = _mask(block_logits, block_options(mask, tier_idx, position_idx, top_k_idx))
        return top_k_logits, block_logits

    def stage1_distributions(self, *args, **kwargs) -> tuple[Categorical, Categorical]:
        """``stage1_logits`` as (tier, insertion position) ``Categorical`` distributions."""
        return tuple(Categorical(logits=x) for x in self.stage1_logits(*args, **kwargs))

    def stage2_distributions(self, *args, **kwargs) -> tuple[Categorical, Categorical]:
        """``stage2_logits`` as (top_k, num_active_blocks) ``Categorical`` distributions."""
        return tuple(Categorical(logits=x) for x in self.stage2_logits(*args, **kwargs))

    # --- choosing -----------------------------------------------------------------
    @torch.no_grad()
    def sample_stage1(
        self,
        lang_feat: torch.Tensor,
        budget_feat: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tier_idx (N,), insertion_position_idx (N,)): drawn from ``generator``, or argmax if ``greedy``."""
        tier_logits, position_logits = self.stage1(self._question(lang_feat), budget_feat)
        if mask is None:
            return _draw(tier_logits, generator, greedy), _draw(position_logits, generator, greedy)
        # One forward; only the masks are sequential (the position's depends on the tier).
        tier = _draw(_mask(tier_logits, tier_options(mask)), generator, greedy)
        return tier, _draw(_mask(position_logits, position_options(mask, tier)), generator, greedy)

    @torch.no_grad()
    def sample_stage2(
        self,
        tier_idx: torch.Tensor,
        insertion_position_idx: torch.Tensor,
        lang_feat: torch.Tensor | None = None,
        budget_feat: torch.Tensor | None = None,
        latency_token: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_idx (N,), num_active_blocks_idx (N,)); totals p forbids and closed options are never chosen."""
        top_k_logits, block_logits = self.stage2_logits(
            insertion_position_idx, lang_feat, budget_feat, latency_token, mask, tier_idx, vision_feat=vision_feat
        )
        top_k = _draw(top_k_logits, generator, greedy)
        if mask is not None:
            block_logits = _mask(block_logits, block_options(mask, tier_idx, insertion_position_idx, top_k))
        return top_k, _draw(block_logits, generator, greedy)

    @torch.no_grad()
    def sample(
        self,
        lang_feat: torch.Tensor,
        budget_feat: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        vision_feat: torch.Tensor | None = None,
    ) -> Decisions:
        """Mode B: all four choices before the VLM runs. (Mode A samples Stage 2 at the pause: ``ModeADecider``.)

        With ``config.vision_stats``, ``vision_feat`` (N, T, 2 lang_dim) holds the vision
        statistics at every tier (``knoblib.vision_features.vision_statistics_all_tiers``);
        Stage 2 reads each row's at the tier Stage 1 chose.
        """
        if self.mode != "B":
            raise ValueError(
                "sample() needs Mode B: in Mode A, Stage 2 reads the latency token at the pause "
                "(use sample_stage1 and a ModeADecider with KnobVLM.generate)"
            )
        tier, position = self.sample_stage1(lang_feat, budget_feat, mask, generator, greedy)
        chosen = None
        if self.config.vision_stats:
            chosen = _at_tier(vision_feat, tier, len(self.knob_space.tiers), 2 * self.config.lang_dim)
        top_k, blocks = self.sample_stage2(
            tier, position, lang_feat, budget_feat, mask=mask, generator=generator, greedy=greedy, vision_feat=chosen
        )
        return Decisions(tier, position, top_k, blocks)

    def joint_log_probs(
        self, lang_feat: torch.Tensor, budget_feat: torch.Tensor, mask: torch.Tensor, vision_feat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mode B: log pi(tier, p, top_k, blocks) of every configuration, (N, T, P, K, NB); -inf where closed.

        The product of the four choices' probabilities, each under its slice of ``mask``
        (N, T, P, K, NB) given the choices before it, as ``evaluate_actions`` scores one
        configuration; here Stage 2 runs once for each p (and, with ``config.vision_stats``,
        once for each (tier, p), reading ``vision_feat`` (N, T, 2 lang_dim) at that tier).
        Used to fit the controller to the expected reward of every configuration
        (``JointGRPOTrainer.fit_to_correctness``).
        """
        if self.mode != "B":
            raise ValueError("joint_log_probs needs Mode B: Mode A's Stage 2 reads a latency token per p")
        n, num_t, num_p, num_k, num_b = mask.shape
        device = self.stage1.tier_head.weight.device
        mask = mask.to(device)

        def log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            # Rows with nothing allowed give NaN; they are closed anyway (-inf).
            return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, float("-inf"))

        tier_logits, position_logits = self.stage1(self._question(lang_feat), budget_feat)
        log_tier = log_softmax(tier_logits, mask.flatten(2).any(-1))  # (N, T)
        log_position = log_softmax(position_logits[:, None, :].expand(n, num_t, num_p), mask.flatten(3).any(-1))  # (N, T, P)
        if self.config.vision_stats:
            width = 2 * self.config.lang_dim
            if vision_feat is None or tuple(vision_feat.shape) != (n, num_t, width):
                got = None if vision_feat is None else tuple(vision_feat.shape)
                raise ValueError(f"vision_feat has shape {got}: expected ({n}, {num_t}, {width}), the statistics at every tier")
            # One Stage-2 row per (request, tier, p): the vision statistics differ by tier.
            p = torch.arange(1, num_p + 1, device=device).repeat(n * num_t)
            top_k_logits, block_logits = self.stage2(
                p,
                lang_feat=self._question(lang_feat).repeat_interleave(num_t * num_p, 0),
                budget_feat=budget_feat.repeat_interleave(num_t * num_p, 0),
                vision_feat=vision_feat.reshape(n * num_t, width).repeat_interleave(num_p, 0),
            )
            top_k_logits = top_k_logits.view(n, num_t, num_p, num_k)
            block_logits = block_logits.view(n, num_t, num_p, 1, num_b).expand(n, num_t, num_p, num_k, num_b)
        else:
            p = torch.arange(1, num_p + 1, device=device).repeat(n)
            top_k_logits, block_logits = self.stage2(
                p,
                lang_feat=self._question(lang_feat).repeat_interleave(num_p, 0),
                budget_feat=budget_feat.repeat_interleave(num_p, 0),
            )
            top_k_logits = top_k_logits.view(n, 1, num_p, num_k).expand(n, num_t, num_p, num_k)
            block_logits = block_logits.view(n, 1, num_p, 1, num_b).expand(n, num_t, num_p, num_k, num_b)
        log_top_k = log_softmax(top_k_logits, mask.any(-1))  # (N, T, P, K)
        log_blocks = log_softmax(block_logits, mask)  # (N, T, P, K, NB)
        return log_tier[..., None, None, None] + log_position[..., None, None] + log_top_k[..., None] + log_blocks

    # --- scoring for GRPO ---------------------------------------------------------
    def evaluate_actions(
        self,
        decisions: Decisions,
        lang_feat: torch.Tensor,
        budget_feat: torch.Tensor,
        mask: torch.Tensor | None = None,
        latency_token: torch.Tensor | None = None,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Joint log-probability and per-knob entropies of the taken decisions.

        Args:
            decisions: the N rows' choices (indices).
            lang_feat: (N, lang_dim).
            budget_feat: (N, budget_dim); from ``encode_budget`` so gradients reach the encoder.
            mask: the budget guard's feasibility mask (N, T, P, K, NB) the decisions were
                sampled under (each knob is scored under the same slice, given the
                choices taken), or None.
            latency_token: (N, latency_dim), Mode A only (read from the frozen VLM, no grad).
            vision_feat: (N, 2 lang_dim), Mode B with ``config.vision_stats`` only: the
                statistics at each row's tier.

        Returns:
            ``(log_prob (N,), entropies)``: ``log_prob`` is the sum of the four choices'
            log-probabilities; ``entropies`` maps each knob name (``KNOB_NAMES``) to (N,).
        """
        if not isinstance(decisions, Decisions):
            raise TypeError(f"decisions must be a Decisions, got {type(decisions).__name__}")
        decisions.check(self.knob_space)
        n = len(decisions)
        _check_features("lang_feat", lang_feat, self.config.lang_dim, n)
        device = self.stage1.tier_head.weight.device
        decisions = decisions.to(device)
        if mask is not None:
            mask = mask.to(device)
        logits = (
            *self.stage1_logits(lang_feat, budget_feat, mask, decisions.tier),
            *self.stage2_logits(
                decisions.insertion_position, lang_feat, budget_feat, latency_token, mask, decisions.tier, decisions.top_k,
                vision_feat=vision_feat,
            ),
        )
        dists = {name: Categorical(logits=x) for name, x in zip(KNOB_NAMES, logits)}
        log_probs = [dists[name].log_prob(getattr(decisions, name)) for name in KNOB_NAMES]
        entropies = {name: dists[name].entropy() for name in KNOB_NAMES}
        return torch.stack(log_probs).sum(0), entropies

    def forward(
        self,
        decisions: Decisions,
        lang_feat: torch.Tensor,
        budget_feat: torch.Tensor,
        mask: torch.Tensor | None = None,
        latency_token: torch.Tensor | None = None,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as ``evaluate_actions`` (the call that needs gradients)."""
        return self.evaluate_actions(decisions, lang_feat, budget_feat, mask, latency_token, vision_feat)


class ModeADecider:
    """Stage 2 at the pause of a resumable Mode-A forward (``KnobVLM.generate(decide=...)``).

    At each row's pause the VLM calls it with that row's latency token; it samples
    (top_k, num_active_blocks) for the row and records the token and the indices, so
    GRPO can score the same choices later with ``evaluate_actions``.

    Args:
        controller: a Mode-A ``TwoStageController``.
        tier_idx, insertion_position_idx: (N,) Stage 1's choices per row (indices).
        mask: the budget guard's feasibility mask (N, T, P, K, NB), or None.
        generator, greedy: as in ``sample_stage2``.
    """

    def __init__(
        self,
        controller: TwoStageController,
        tier_idx: torch.Tensor,
        insertion_position_idx: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> None:
        if controller.mode != "A":
            raise ValueError("ModeADecider needs a Mode-A controller (config.mode='A')")
        self.controller = controller
        # Everything the decider records lives on the controller's device (the VLM may differ).
        device = controller.device
        self.tier_idx = torch.as_tensor(tier_idx).long().to(device)
        self.insertion_position_idx = torch.as_tensor(insertion_position_idx).long().to(device)
        self.mask = None if mask is None else mask.to(device)
        self.generator, self.greedy = generator, greedy
        n = self.insertion_position_idx.shape[0]
        self.latency_tokens = torch.full((n, controller.config.latency_dim), float("nan"), device=device)
        self.top_k = torch.full((n,), -1, dtype=torch.long, device=device)
        self.num_active_blocks = torch.full((n,), -1, dtype=torch.long, device=device)

    def __call__(self, latency_tokens: torch.Tensor, rows: torch.Tensor) -> tuple[list[int], list[int]]:
        """(latency tokens (n, d), row indices (n,)) -> (top_k values, num_active_blocks values)."""
        device = self.insertion_position_idx.device
        rows = torch.as_tensor(rows).long().to(device)
        # generate() runs under inference_mode; a clone made outside it can be used by autograd later.
        with torch.inference_mode(False):
            tokens = latency_tokens.detach().float().to(device).clone()
        top_k, blocks = self.controller.sample_stage2(
            self.tier_idx[rows],
            self.insertion_position_idx[rows],
            latency_token=tokens,
            mask=None if self.mask is None else self.mask[rows],
            generator=self.generator,
            greedy=self.greedy,
        )
        with torch.inference_mode(False):
            self.latency_tokens[rows] = tokens
            self.top_k[rows] = top_k.to(device).clone()
            self.num_active_blocks[rows] = blocks.to(device).clone()
        space = self.controller.knob_space
        top_k_values = [space.top_k_options[i] for i in top_k.tolist()]
        return top_k_values, [space.all_block_options[i] for i in blocks.tolist()]

    def decisions(self) -> Decisions:
        """The full decisions once every row has paused (raises ValueError otherwise)."""
        missing = (self.top_k < 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"rows {missing[:5]} never reached their pause: no Stage-2 decision recorded")
        return Decisions(self.tier_idx, self.insertion_position_idx, self.top_k, self.num_active_blocks)
