"""One request's greedy decision: the controller's batch-1 serving path.

Serving decides for one request at a time, and at batch 1 on a CPU the decision is all
overhead: a few 64-wide matrix products, each cheaper than the Python and dispatch around
it (an ``nn.Module`` call or one more small tensor op costs about as much as the product
inside it). The decision must stay a small share of the *cheapest* request's latency (at
most 2 %), so this path does the same arithmetic as the modules with fewer, larger ops:

* **folded weights.** Everything both stages compute from the question and the budget
  before they branch is linear up to one activation, so it is folded into one matrix:
  the LayerNorms' scales and shifts go into the linear layers after them, the budget
  encoder's output layer into the layers that read ``budget_feat``, Stage 1's first
  layer and Mode-B Stage 2's two projections are stacked, each stage's two heads are
  stacked, and Stage 2's insertion-position embedding (a constant per p, after its
  activation) becomes a bias per p. The fold is recomputed whenever a parameter changes
  (``Tensor._version``), so the path is never stale;
* the budget's sinusoidal encoding of one number is computed in Python;
* the budget guard's feasibility is a sorted list of this machine's latencies: the
  configurations that fit a budget are a prefix of it (one ``bisect``), and each greedy
  choice takes the best-scoring option that still has a fitting configuration under it,
  in plain Python over at most a few dozen configurations.

It makes the choices of ``TwoStageController.sample_stage1`` / ``sample_stage2`` with
``greedy=True`` under the guard's mask, from the same logits up to float rounding
(``tests/test_decision.py`` checks both on random questions and budgets).
``benchmarks/bench_overhead.py`` measures what it costs against the cheapest request.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F

from .guard import BudgetGuard
from .knobs import KnobConfig

_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class GreedyDecider:
    """Greedy batch-1 decisions of a trained controller under this machine's budget guard.

    Args:
        controller: a ``TwoStageController`` (Mode A or B), in eval mode.
        language: the VLM's ``LanguageFeatureExtractor``.
        reference_ms: this machine's full-configuration latency (``LatencyTable.reference_ms``).
        guard: the budget guard, or None (every configuration open).
    """

    def __init__(self, controller, language, reference_ms: float, guard: BudgetGuard | None = None) -> None:
        self.controller = controller
        self.language = language
        self.reference_ms = float(reference_ms)
        self.space = controller.knob_space
        self.guard = guard
        space = self.space
        # Every valid configuration as option indices, sorted by its latency at the guard's
        # quantile: the configurations that fit a budget are a prefix of this list.
        rows = []
        for knobs in space:
            index = (
                space.tiers.index(knobs.tier),
                space.insertion_positions.index(knobs.insertion_position),
                space.top_k_options.index(knobs.top_k),
                space.all_block_options.index(knobs.num_active_blocks),
            )
            rows.append((float(guard.grid[index]) if guard is not None else 0.0, index))
        rows.sort()
        self._latencies = [lat for lat, _ in rows]
        self._configs = [index for _, index in rows]
        self._params = list(controller.parameters())
        self._versions: list[int] | None = None
        encoder = controller.budget_encoder
        self._range = encoder.budget_range
        self._max_price = encoder.max_price
        self._use_question = controller.config.use_question
        self._frequencies = list(encoder.frequencies)
        self._act = _ACTIVATIONS[controller.config.hidden_act]
        self._mode_b = controller.stage2.use_optimized_mode
        self._vision = bool(getattr(controller.stage2, "vision_dim", 0))
        self._hidden = controller.config.hidden_dim
        self._lang_dim = controller.config.lang_dim

    # --- feasibility ------------------------------------------------------------------
    def fitting(self, budget_ms: float) -> list[tuple[int, int, int, int]]:
        """Option indices of the configurations that fit ``budget_ms`` (only the fastest if none does)."""
        if self.guard is None:
            return self._configs
        # As BudgetGuard.mask: a budget nothing fits is raised to the fastest latency.
        count = bisect.bisect_right(self._latencies, max(budget_ms, self._latencies[0]))
        return self._configs[:count]

    @staticmethod
    def _best(scores: list[float], allowed) -> int:
        """The index of the highest score among ``allowed`` (ties: the lowest index, like argmax)."""
        return max(sorted(allowed), key=lambda i: (scores[i], -i))

    # --- the folded weights -----------------------------------------------------------
    @torch.no_grad()
    def _fold(self) -> None:
        """Recompute the folded matrices from the controller's parameters (see the module docstring)."""
        c = self.controller
        w = {name: p.detach() for name, p in c.named_parameters()}
        d, h = c.config.lang_dim, self._hidden

        def scaled(weight: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
            # W (g * n + b) = (W diag g) n + W b: a LayerNorm's affine folded into the layer after it.
            return weight * w[norm + ".weight"], weight @ w[norm + ".bias"]

        out_w, out_b = w["budget_encoder.mlp.2.weight"], w["budget_encoder.mlp.2.bias"]  # budget_feat = out_w h + out_b
        first = w["stage1.trunk.0.weight"]
        s1_lang, s1_shift = scaled(first[:, :d], "stage1.lang_norm")
        s1_budget = first[:, d:] @ out_w
        s1_bias = s1_shift + first[:, d:] @ out_b + w["stage1.trunk.0.bias"]
        lang_rows, budget_rows, biases = [s1_lang], [s1_budget], [s1_bias]
        if self._mode_b:
            lp_lang, lp_shift = scaled(w["stage2.lang_proj.1.weight"], "stage2.lang_proj.0")
            lang_rows += [lp_lang, torch.zeros(h, d)]
            budget_rows += [torch.zeros(h, out_w.shape[1]), w["stage2.budget_proj.weight"] @ out_w]
            biases += [lp_shift + w["stage2.lang_proj.1.bias"], w["stage2.budget_proj.weight"] @ out_b + w["stage2.budget_proj.bias"]]
        # One product from [layer_norm(lang) without affine, the budget encoder's hidden layer]:
        # Stage 1's pre-activation (h) and, in Mode B, Stage 2's two projections (2h).
        self._shared = torch.cat([torch.cat(lang_rows), torch.cat(budget_rows)], dim=1)
        self._shared_bias = torch.cat(biases)
        self._budget_in = (w["budget_encoder.mlp.0.weight"], w["budget_encoder.mlp.0.bias"])
        self._trunk = (w["stage1.trunk.2.weight"], w["stage1.trunk.2.bias"])
        self._heads1 = (
            torch.cat([w["stage1.tier_head.weight"], w["stage1.insertion_head.weight"]]),
            torch.cat([w["stage1.tier_head.bias"], w["stage1.insertion_head.bias"]]),
        )
        self._num_tiers = w["stage1.tier_head.weight"].shape[0]
        # Stage 2's fusion layer reads act([parts..., embedding(p)]): the embedding's part is
        # a constant per p, folded into a bias per p.
        fusion, fusion_bias = w["stage2.fusion.1.weight"], w["stage2.fusion.1.bias"]
        parts = 2 if self._mode_b else 1
        embedding = self._act(w["stage2.insertion_embedding.weight"])  # (P, h)
        self._fusion = fusion[:, : parts * h]
        self._fusion_bias = embedding @ fusion[:, parts * h : (parts + 1) * h].T + fusion_bias  # (P, h)
        if self._vision:
            # The vision statistics' part comes after the p embedding (``Knob2Knob3Predictor``).
            self._vision_in = scaled(w["stage2.vision_proj.1.weight"], "stage2.vision_proj.0")
            self._vision_in = (self._vision_in[0], self._vision_in[1] + w["stage2.vision_proj.1.bias"])
            self._fusion_vision = fusion[:, (parts + 1) * h :]
        if not self._mode_b:
            self._token = scaled(w["stage2.latency_token_proj.weight"], "stage2.latency_norm")
            self._token = (self._token[0], self._token[1] + w["stage2.latency_token_proj.bias"])
        self._heads2 = (
            torch.cat([w["stage2.top_k_head.weight"], w["stage2.block_head.weight"]]),
            torch.cat([w["stage2.top_k_head.bias"], w["stage2.block_head.bias"]]),
        )
        self._num_top_k = w["stage2.top_k_head.weight"].shape[0]

    def _fresh(self) -> None:
        versions = [p._version for p in self._params]
        if versions != self._versions:
            self._fold()
            self._versions = versions

    # --- the decision -----------------------------------------------------------------
    def _waves(self, x: float) -> list[float]:
        return [x] + [math.sin(f * x) for f in self._frequencies] + [math.cos(f * x) for f in self._frequencies]

    def sinusoidal(self, budget_ratio: float, price: float = 0.0) -> list[float]:
        """``LatencyBudgetEncoder.sinusoidal`` of one relative budget (``inf``: none) and price, in Python."""
        lo, hi = self._range
        u = min(max((budget_ratio - lo) / (hi - lo), 0.0), 1.0)
        if self._max_price <= 0:
            return self._waves(u)
        return self._waves(u) + self._waves(min(max(price / self._max_price, 0.0), 1.0))

    def features(self, question: str, budget_ms: float, price: float = 0.0) -> torch.Tensor:
        """The activated shared layer (1, h or 3h) for one request; call under ``torch.inference_mode``.

        Its first h columns are Stage 1's first hidden layer; in Mode B the next 2h are
        Stage 2's activated projections of the question and the budget.
        """
        self._fresh()
        ratio = budget_ms / self.reference_ms
        if math.isfinite(ratio) and not self._range[0] <= ratio <= self._range[1] and not self.controller.budget_encoder.warned:
            self.controller.budget_encoder.normalise(torch.tensor([ratio]))  # warns once, as every other path does
        if self._use_question:
            ids = self.language.token_ids(question)
            if not ids:
                raise ValueError(f"the question has no tokens: {question!r}")
            normalised = F.layer_norm(self.language.pool([ids]), (self._lang_dim,))
        else:  # the budget-only ablation reads zeros (their LayerNorm is zero too)
            normalised = torch.zeros(1, self._lang_dim)
        budget_hidden = self._act(F.linear(torch.tensor([self.sinusoidal(ratio, price)]), *self._budget_in))
        return self._act(F.linear(torch.cat([normalised, budget_hidden], dim=1), self._shared, self._shared_bias))

    def stage1(self, shared: torch.Tensor, fitting) -> tuple[int, int]:
        """Greedy (tier index, insertion position index) among the fitting configurations."""
        hidden = self._act(F.linear(shared[:, : self._hidden], *self._trunk))
        scores = F.linear(hidden, *self._heads1)[0].tolist()
        tier = self._best(scores[: self._num_tiers], {c[0] for c in fitting})
        position = self._best(scores[self._num_tiers :], {c[1] for c in fitting if c[0] == tier})
        return tier, position

    def stage2(
        self, tier: int, position: int, fitting, shared: torch.Tensor | None = None, latency_token: torch.Tensor | None = None,
        vision_feat: torch.Tensor | None = None,
    ) -> tuple[int, int]:
        """Greedy (top_k index, num_active_blocks index) given Stage 1's choice.

        Mode B reads ``shared`` (from :meth:`features`, which refreshed the fold) and, with
        ``config.vision_stats``, ``vision_feat`` (1, 2 d) at the chosen tier; Mode A the
        ``latency_token`` (1, d). Call under ``torch.inference_mode``.
        """
        if self._mode_b:
            parts = shared[:, self._hidden :]
        else:
            self._fresh()  # Mode A decides at the pause, apart from features()
            token = F.layer_norm(latency_token.float(), latency_token.shape[-1:])
            parts = self._act(F.linear(token, *self._token))
        pre = F.linear(parts, self._fusion, self._fusion_bias[position])
        if self._vision:
            if vision_feat is None:
                raise ValueError("this controller's Stage 2 reads vision statistics: pass vision_feat (1, 2 d) of the chosen tier")
            stats = F.layer_norm(vision_feat.float(), vision_feat.shape[-1:])
            pre = pre + F.linear(self._act(F.linear(stats, *self._vision_in)), self._fusion_vision)
        hidden = self._act(pre)
        scores = F.linear(hidden, *self._heads2)[0].tolist()
        below = [c for c in fitting if c[0] == tier and c[1] == position]
        top_k = self._best(scores[: self._num_top_k], {c[2] for c in below})
        # Totals that p forbids have no configuration, so they are never among the fitting ones.
        return top_k, self._best(scores[self._num_top_k :], {c[3] for c in below if c[2] == top_k})

    def knobs(self, tier: int, position: int, top_k: int, blocks: int) -> KnobConfig:
        space = self.space
        return KnobConfig(
            space.tiers[tier], space.insertion_positions[position], space.top_k_options[top_k], space.all_block_options[blocks]
        )

    @torch.inference_mode()
    def decide(self, question: str, budget_ms: float, price: float = 0.0) -> KnobConfig:
        """Mode B: all four knobs for one request (budget ``inf``: none), before the model runs."""
        fitting = self.fitting(budget_ms)
        shared = self.features(question, budget_ms, price)
        tier, position = self.stage1(shared, fitting)
        return self.knobs(tier, position, *self.stage2(tier, position, fitting, shared))
