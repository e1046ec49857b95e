"""The controller's cheap inputs: question features, the budget encoding and the Mode-A probe.

* ``LanguageFeatureExtractor``: ``lang_feat`` (N, d_model), the mean of the frozen VLM's
  own input embeddings of the question tokens. No transformer pass, so Stage 1 (and
  Mode-B Stage 2) decide before the model runs.
* ``LatencyBudgetEncoder``: ``budget_feat`` (N, out_dim), a multi-frequency sinusoidal
  encoding of the normalised budget followed by a small MLP (trained with the controller).
* ``BudgetProbe``: the input embedding (N, d_model) of the Mode-A probe token, a fixed
  random projection of the budget's sinusoidal encoding. Its hidden state after block
  p-1 is the latency token.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .latency import check_budgets as _as_budgets


class LanguageFeatureExtractor:
    """Mean-pooled input embeddings of the question tokens (the original system's ``lang_feat``).

    Args:
        embedding: the VLM's input embedding table (``KnobVLM.input_embeddings``), frozen.
        tokenizer: the VLM's tokenizer (``KnobVLM.tokenizer``).
    """

    def __init__(self, embedding: nn.Embedding, tokenizer) -> None:
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        self.embedding = embedding
        self.tokenizer = tokenizer
        # The Rust tokenizer (same normaliser and pre-tokenizer as ``tokenizer(...)``): at
        # batch 1 the Python wrapper costs more than the whole controller.
        self._backend = tokenizer.backend_tokenizer if tokenizer is not None else None

    @classmethod
    def from_vlm(cls, vlm) -> "LanguageFeatureExtractor":
        """The extractor for a ``KnobVLM`` (its input embeddings and tokenizer)."""
        return cls(vlm.input_embeddings, vlm.tokenizer)

    @property
    def dim(self) -> int:
        """d_model, the width of ``lang_feat``."""
        return self.embedding.embedding_dim

    def mean_embedding_norm(self) -> float:
        """Mean L2 norm of the embedding table's rows: the ``scale`` to give ``BudgetProbe``."""
        with torch.no_grad():
            return float(self.embedding.weight.float().norm(dim=-1).mean())

    def __call__(self, questions: Sequence[str]) -> torch.Tensor:
        """Return ``lang_feat`` (N, d_model), float32, detached, for N question strings."""
        if isinstance(questions, str):
            # A str is a sequence too: it would become one question per character.
            raise TypeError(
                f"questions must be a list of question strings, got a single str {questions[:40]!r}: wrap it as [question]"
            )
        if len(questions) == 0:
            raise ValueError("questions is empty: give at least one question")
        for i, question in enumerate(questions):
            if not isinstance(question, str):
                raise ValueError(f"question {i} is not a string: {question!r}")
        # No BOS/EOS: special tokens are shared by every prompt and would only blur the mean.
        encodings = self._backend.encode_batch(list(questions), add_special_tokens=False)
        token_ids = [e.ids for e in encodings]
        for i, ids in enumerate(token_ids):
            if len(ids) == 0:
                raise ValueError(f"question {i} is empty (no tokens): {questions[i]!r}")
        # The VLM is frozen: no graph into its embedding table.
        with torch.no_grad():
            return self.pool(token_ids)

    def pool(self, token_ids: list[list[int]]) -> torch.Tensor:
        """``lang_feat`` (N, d_model) from N non-empty lists of token ids; no checks, no gradient
        (``__call__`` makes the checks; call under ``torch.no_grad`` or ``torch.inference_mode``)."""
        weight = self.embedding.weight
        if len(token_ids) == 1:
            pooled = weight[torch.tensor(token_ids[0], device=weight.device)].mean(0, keepdim=True)
        else:
            flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=weight.device)
            lengths = torch.tensor([len(ids) for ids in token_ids], device=weight.device)
            offsets = torch.cumsum(lengths, 0) - lengths
            pooled = F.embedding_bag(flat, weight, offsets, mode="mean")
        return pooled if pooled.dtype == torch.float32 else pooled.float()

    def token_ids(self, question: str) -> list[int]:
        """The question's token ids (no BOS/EOS), as ``__call__`` pools them."""
        return self._backend.encode(question, add_special_tokens=False).ids


class BudgetOutOfRangeWarning(UserWarning):
    """A budget outside the range the controller was trained on was saturated to the range's edge."""


class LatencyBudgetEncoder(nn.Module):
    """``budget_feat`` (N, out_dim): a sinusoidal encoding of the normalised budget (and the
    latency price), then an MLP.

    The budget arrives *relative to the serving machine's full-configuration latency*
    (``LatencyTable.relative``: 0.75 = three quarters of what the whole model takes
    here), so the same controller means the same thing on a machine 4x slower or faster.
    ``inf`` means no per-request budget (the average-latency mode): it is encoded as the
    top of the range, where every configuration fits.

    With ``max_price > 0`` the controller also reads a *latency price* lambda >= 0
    (``knoblib.reward``: the reward pays ``lambda * latency / full latency``), encoded the
    same way as ``v = lambda / max_price`` (clamped to [0, 1]) and concatenated: a stream
    served at a target *mean* latency sets the price (``knoblib.plane.find_price``), a
    request with only a budget has price 0.

    Args:
        budget_range: (lo, hi), the relative budgets the controller is trained on;
            ``u = (r - lo) / (hi - lo)``. A budget outside it is *saturated* to the edge
            (u clamped to [0, 1]): the controller never acts on an input it was not
            trained on, so more budget than it ever saw is served like the most it saw,
            never worse. The first saturation warns once (``BudgetOutOfRangeWarning``).
        num_frequencies: F, sin/cos pairs in the encoding (its width is 2F + 1).
        hidden_dim: width of the MLP's hidden layer.
        out_dim: width of ``budget_feat``.
        hidden_act: the MLP's activation (``knoblib.controller.ACTIVATIONS``).
        max_price: the largest latency price trained on; 0 = no price input.
    """

    def __init__(
        self,
        budget_range: tuple[float, float],
        num_frequencies: int = 6,
        hidden_dim: int = 64,
        out_dim: int = 64,
        hidden_act: str = "gelu_tanh",
        max_price: float = 0.0,
    ) -> None:
        from .controller import activation

        super().__init__()
        if len(budget_range) != 2:
            raise ValueError(f"budget_range={budget_range!r} is invalid: expected (lo, hi)")
        lo, hi = float(budget_range[0]), float(budget_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise ValueError(f"budget_range={budget_range!r} is invalid: need finite 0 <= lo < hi")
        for name, value in (("num_frequencies", num_frequencies), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
        if not (isinstance(max_price, (int, float)) and math.isfinite(max_price) and max_price >= 0):
            raise ValueError(f"max_price={max_price!r} is invalid: must be a finite number >= 0")
        self.budget_range = (lo, hi)
        self.max_price = float(max_price)
        self.num_frequencies = num_frequencies
        self.out_dim = out_dim
        self.warned = False
        # Why these frequencies: the original encoded u in [0, 1] with the transformer
        # schedule 1 / 10000^(2i/d), i.e. angular frequencies <= 1 rad per unit of u, so
        # every sin stayed near 0 and every cos near 1: the lowest and highest budgets had
        # cosine similarity ~0.92-0.97 and budgets 5% of the range apart ~0.9998 (tested).
        # Here the frequencies double from pi/2: the lowest pair turns a quarter period over
        # [lo, hi] (monotone, so lo and hi never alias), the highest (2^(F-2) pi) resolves
        # a few percent of the range. Starting at pi instead makes every pair complete whole
        # periods over the range, so lo and hi coincide on all of them but one (similarity
        # 0.62 for F = 6 instead of 0.46).
        # A plain list, not a buffer: transformers' from_pretrained leaves non-persistent
        # buffers uninitialised.
        self.frequencies = [(math.pi / 2) * 2.0**i for i in range(num_frequencies)]
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding_dim, hidden_dim),
            activation(hidden_act),
            nn.Linear(hidden_dim, out_dim),
        )

    @property
    def encoding_dim(self) -> int:
        """The width of ``sinusoidal``: 2F + 1 for the budget, as much again for the price."""
        return (2 if self.max_price > 0 else 1) * (2 * self.num_frequencies + 1)

    def normalise(self, budget_ratio: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """u = (r - lo) / (hi - lo) clamped to [0, 1], (N,); ``inf`` (no budget) is 1.

        ValueError for NaN or non-positive budgets.
        """
        ratios = _as_budgets(budget_ratio, allow_inf=True).to(self.mlp[0].weight.device)
        lo, hi = self.budget_range
        u = (ratios - lo) / (hi - lo)
        # A hair of slack: a float32 budget at the range's edge rounds just outside it. No
        # budget at all (inf) is not "outside": it is the average-latency mode.
        outside = ((u < -1e-6) | (u > 1 + 1e-6)) & torch.isfinite(ratios)
        if not self.warned and bool(outside.any()):
            self.warned = True
            value = float(ratios[outside][0])
            warnings.warn(
                f"a budget of {value:.3g} x the full configuration's latency is outside the range "
                f"[{lo:.3f}, {hi:.3f}] this controller was trained on: it is served as the nearest edge "
                "(more budget is never served worse). This warning is shown once per controller.",
                BudgetOutOfRangeWarning,
                stacklevel=3,
            )
        return u.clamp(0.0, 1.0)

    def normalise_price(self, price: torch.Tensor | Sequence[float] | None, n: int) -> torch.Tensor:
        """v = lambda / max_price clamped to [0, 1], (n,); None is price 0."""
        device = self.mlp[0].weight.device
        if price is None:
            return torch.zeros(n, dtype=torch.float64, device=device)
        price = torch.as_tensor(price, dtype=torch.float64, device=device).reshape(-1)
        if price.shape[0] != n:
            raise ValueError(f"got {price.shape[0]} prices for {n} budgets: give one per request")
        if bool((~torch.isfinite(price) | (price < 0)).any()):
            raise ValueError(f"prices must be finite and >= 0, got {price.tolist()[:5]}")
        return (price / self.max_price).clamp(0.0, 1.0)

    def _waves(self, x: torch.Tensor) -> torch.Tensor:
        angles = x[:, None] * torch.tensor(self.frequencies, dtype=x.dtype, device=x.device)
        return torch.cat([x[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)

    def sinusoidal(
        self, budget_ratio: torch.Tensor | Sequence[float], price: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """[u, sin(w_i u), cos(w_i u)] (and the same of v, the price) for w_i = 2^i pi / 2, i < F.

        (N, encoding_dim), no parameters. A price given to a controller without a price
        input is refused.
        """
        u = self.normalise(budget_ratio)
        parts = [self._waves(u)]
        if self.max_price > 0:
            parts.append(self._waves(self.normalise_price(price, u.shape[0])))
        elif price is not None and bool((torch.as_tensor(price) != 0).any()):
            raise ValueError("this controller has no price input (max_price=0): it serves per-request budgets only")
        # Computed in float64 (budgets are), returned in the MLP's dtype.
        return torch.cat(parts, dim=-1).to(self.mlp[0].weight.dtype)

    def forward(
        self, budget_ratio: torch.Tensor | Sequence[float], price: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """``budget_feat`` (N, out_dim) for budgets (N,) as fractions of the full configuration's latency
        (``inf``: none) and latency prices (N,) (None: 0)."""
        from .controller import apply

        return apply(self.mlp, self.sinusoidal(budget_ratio, price))


class BudgetProbe(nn.Module):
    """The Mode-A probe token's input embedding: a fixed projection of the budget encoding.

    The latency token is the probe's hidden state after block p-1, read from the frozen
    VLM under no_grad, so no gradient could train the probe anyway; keeping it fixed also
    keeps the latency token's meaning stable while the controller learns to read it.

    Args:
        encoder_dim: width of the sinusoidal encoding (``LatencyBudgetEncoder.encoding_dim``).
        d_model: the VLM's hidden size.
        seed: seeds the random projection (a buffer, saved with the controller).
        scale: the norm of every probe embedding; pass the VLM's mean token-embedding norm
            (``LanguageFeatureExtractor.mean_embedding_norm()``) so the probe looks like a token.
    """

    def __init__(self, encoder_dim: int, d_model: int, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        for name, value in (("encoder_dim", encoder_dim), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} is invalid: must be finite and > 0")
        self.encoder_dim = encoder_dim
        self.d_model = d_model
        self.seed = int(seed)
        self.scale = float(scale)
        # Persistent: a checkpoint carries the exact projection it was trained with.
        self.register_buffer("projection", self.seeded_projection())

    def seeded_projection(self) -> torch.Tensor:
        """The (encoder_dim, d_model) Gaussian projection drawn from ``seed`` (CPU generator)."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.randn(self.encoder_dim, self.d_model, generator=generator, device="cpu")

    def forward(self, sinusoidal_features: torch.Tensor) -> torch.Tensor:
        """Probe embeddings (N, d_model), each of norm ``scale``, for features (N, encoder_dim)."""
        if sinusoidal_features.dim() != 2 or sinusoidal_features.shape[1] != self.encoder_dim:
            raise ValueError(
                f"sinusoidal_features has shape {tuple(sinusoidal_features.shape)}: expected (N, {self.encoder_dim})"
            )
        projected = sinusoidal_features.to(self.projection.dtype) @ self.projection
        return self.scale * projected / projected.norm(dim=-1, keepdim=True).clamp_min(1e-12)
