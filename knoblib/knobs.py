"""The knob space: the four choices a controller makes per request.

| knob | stage | what it changes |
|---|---|---|
| ``tier`` | 1 | vision crops: the vision tower's work and the LLM sequence length |
| ``insertion_position`` (p) | 1 | the block after which Stage 2 decides |
| ``top_k`` | 2 | MoE experts per token in blocks ``p..L-1`` (blocks ``< p`` keep the default) |
| ``num_active_blocks`` | 2 | blocks executed in total (blocks ``< p`` and block 0 always run) |

The original MolmoE-1B system (16 blocks, top-8 of 64 experts) allowed insertion
positions 1..5, top-k 4..8 and, for each p, the totals
``p + [max(11, rem - 4) .. min(15, rem)]`` with ``rem = 16 - p``. Rewritten as a rule
that scales with the model, that table says:

* ``max_insertion_position P = round(5 L / 16)`` (5 for L = 16),
* ``top_k`` ranges over ``ceil(k0 / 2) .. k0`` (4..8 for k0 = 8),
* at most ``D = L // 4`` blocks may be dropped, and never more than ``P - p``: so the
  allowed totals for p are ``L - min(D, P - p) .. L``
  (p=1: 12..16, p=2: 13..16, p=3: 14..16, p=4: 15..16, p=5: 16 for L = 16).

``KnobSpace.for_model(16, 8)`` reproduces the original table exactly (tested).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from itertools import product
from typing import Iterator

TIERS: tuple[str, ...] = ("low", "medium", "high")


@dataclass(frozen=True, order=True)
class KnobConfig:
    """One setting of the four knobs.

    Types are checked on construction, one rule for every field: ``tier`` is a ``str``;
    ``insertion_position``, ``top_k`` and ``num_active_blocks`` are integers (``int`` or
    another ``numbers.Integral`` such as ``numpy.int64``, stored as ``int``). A float
    is refused even when it holds a whole number (``top_k=4.0``), and so is a bool:
    both would compare equal to a valid option and then fail inside transformers.
    Refusals are ``ValueError`` naming the field and the value. Whether the values are
    allowed for a model is ``KnobSpace.validate``'s check.

    Attributes:
        tier: vision-token tier, one of ``TIERS``.
        insertion_position: the block after which Stage 2 decides (1-based count of
            blocks already run, so ``p = 1`` pauses after block 0).
        top_k: MoE experts per token for blocks ``>= insertion_position``.
        num_active_blocks: total transformer blocks executed.
    """

    tier: str
    insertion_position: int
    top_k: int
    num_active_blocks: int

    def __post_init__(self) -> None:
        if not isinstance(self.tier, str):
            raise ValueError(f"tier={self.tier!r} is invalid: must be a str, one of {list(TIERS)}")
        for name in ("insertion_position", "top_k", "num_active_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} is invalid: must be an int (got {type(value).__name__})")
            # Frozen: numpy / other integral types are stored as plain ints (hashing, JSON).
            object.__setattr__(self, name, int(value))

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        """A compact label such as ``high/p2/k4/b7`` for tables and plots."""
        return f"{self.tier}/p{self.insertion_position}/k{self.top_k}/b{self.num_active_blocks}"


# The knob names, in the order a controller chooses them (and ``KnobConfig``'s field order).
KNOB_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(KnobConfig))


@dataclass(frozen=True)
class KnobSpace:
    """All valid knob configurations for a model with ``num_layers`` blocks.

    Attributes:
        num_layers: transformer blocks in the language model (L).
        default_top_k: the model's trained experts per token (k0).
        max_insertion_position: largest p (P); p ranges over ``1..P``.
        max_dropped_blocks: most blocks that may be skipped (D).
        tiers: the vision tiers, cheapest first.
    """

    num_layers: int
    default_top_k: int
    max_insertion_position: int
    max_dropped_blocks: int
    tiers: tuple[str, ...] = TIERS

    def __post_init__(self) -> None:
        if self.num_layers < 2:
            raise ValueError(f"num_layers={self.num_layers} is invalid: need at least 2 blocks")
        if self.default_top_k < 1:
            raise ValueError(f"default_top_k={self.default_top_k} is invalid: need at least 1 expert per token")
        if not 1 <= self.max_insertion_position < self.num_layers:
            raise ValueError(
                f"max_insertion_position={self.max_insertion_position} is invalid: "
                f"allowed 1..{self.num_layers - 1} for num_layers={self.num_layers}"
            )
        if not 0 <= self.max_dropped_blocks < self.num_layers - 1:
            raise ValueError(
                f"max_dropped_blocks={self.max_dropped_blocks} is invalid: "
                f"allowed 0..{self.num_layers - 2} (block 0 and one more always run)"
            )
        if tuple(self.tiers) != TIERS:
            raise ValueError(f"tiers={self.tiers!r} is invalid: allowed {TIERS!r}")

    @classmethod
    def for_model(cls, num_layers: int = 16, default_top_k: int = 8) -> "KnobSpace":
        """The knob space scaled from the MolmoE-1B rules (see the module docstring)."""
        return cls(
            num_layers=num_layers,
            default_top_k=default_top_k,
            max_insertion_position=max(1, min(num_layers - 1, math.floor(5 * num_layers / 16 + 0.5))),
            max_dropped_blocks=max(1, num_layers // 4) if num_layers > 2 else 0,
        )

    # --- the options of each knob -------------------------------------------------
    @property
    def insertion_positions(self) -> tuple[int, ...]:
        return tuple(range(1, self.max_insertion_position + 1))

    @property
    def top_k_options(self) -> tuple[int, ...]:
        return tuple(range(math.ceil(self.default_top_k / 2), self.default_top_k + 1))

    def block_options(self, insertion_position: int) -> tuple[int, ...]:
        """Allowed ``num_active_blocks`` totals for insertion position p."""
        self._check_insertion_position(insertion_position)
        dropped = min(self.max_dropped_blocks, self.max_insertion_position - insertion_position)
        return tuple(range(self.num_layers - dropped, self.num_layers + 1))

    @property
    def all_block_options(self) -> tuple[int, ...]:
        """Every total that some p allows (the support of Stage 2's blocks head)."""
        return tuple(sorted({n for p in self.insertion_positions for n in self.block_options(p)}))

    # --- configurations -----------------------------------------------------------
    def full(self) -> KnobConfig:
        """The configuration that runs the whole model (highest tier, default top-k, all blocks)."""
        return KnobConfig(self.tiers[-1], self.max_insertion_position, self.default_top_k, self.num_layers)

    def cheapest(self) -> KnobConfig:
        """The configuration doing the least work: lowest tier, smallest top-k, most blocks dropped."""
        p = self.insertion_positions[0]
        return KnobConfig(self.tiers[0], p, self.top_k_options[0], self.block_options(p)[0])

    def with_full_stage2(self, knobs: KnobConfig) -> KnobConfig:
        """``knobs`` with Stage 2 at its largest: default top-k, every block allowed for its p."""
        self.validate(knobs)
        p = knobs.insertion_position
        return KnobConfig(knobs.tier, p, self.default_top_k, self.block_options(p)[-1])

    def __iter__(self) -> Iterator[KnobConfig]:
        for tier, p in product(self.tiers, self.insertion_positions):
            for k, n in product(self.top_k_options, self.block_options(p)):
                yield KnobConfig(tier, p, k, n)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def validate(self, knobs: KnobConfig) -> KnobConfig:
        """Return ``knobs`` if valid in this space, else raise ``ValueError`` naming the field."""
        if not isinstance(knobs, KnobConfig):
            raise TypeError(f"expected a KnobConfig, got {type(knobs).__name__}")
        if knobs.tier not in self.tiers:
            raise ValueError(f"tier={knobs.tier!r} is invalid: allowed {list(self.tiers)}")
        self._check_insertion_position(knobs.insertion_position)
        if knobs.top_k not in self.top_k_options:
            raise ValueError(f"top_k={knobs.top_k!r} is invalid: allowed {list(self.top_k_options)}")
        allowed = self.block_options(knobs.insertion_position)
        if knobs.num_active_blocks not in allowed:
            raise ValueError(
                f"num_active_blocks={knobs.num_active_blocks!r} is invalid for "
                f"insertion_position={knobs.insertion_position}: allowed {list(allowed)}"
            )
        return knobs

    def _check_insertion_position(self, insertion_position: int) -> None:
        if isinstance(insertion_position, bool) or not isinstance(insertion_position, int) or (
            insertion_position not in self.insertion_positions
        ):
            raise ValueError(
                f"insertion_position={insertion_position!r} is invalid: allowed {list(self.insertion_positions)}"
            )

    def as_dict(self) -> dict:
        return {**asdict(self), "tiers": list(self.tiers)}
