"""Exact-match accuracy of the VLM's greedy answers: one loop over the samples, in batches.

Every accuracy in the package is measured here: pretraining's validation checks, the
block ranking (``knoblib.importance``) and the expert ablation (``knoblib.experts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import FAMILIES, VQASample
from .knobs import KnobConfig


@torch.no_grad()
def correct_answers(
    vlm,
    samples: Sequence[VQASample],
    knobs: KnobConfig | None = None,
    *,
    skip_blocks: Sequence[int] | None = None,
    images: Sequence[torch.Tensor] | torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) bool: whether the greedy answer to each sample equals its answer.

    Args:
        vlm: the ``KnobVLM``.
        samples: the N questions.
        knobs: one configuration for every sample (default: the full configuration).
        skip_blocks: analysis only, instead of ``knobs``: the full configuration with
            exactly these blocks skipped (``KnobVLM.generate_skipping``).
        images: the samples' images, rendered once by the caller (N uint8 tensors
            (3, 48, 48) or one (N, 3, 48, 48) tensor); rendered here if None.
        batch_size: samples per ``vlm`` call.
    """
    if knobs is not None and skip_blocks is not None:
        raise ValueError("give knobs or skip_blocks, not both: skip_blocks runs the full configuration")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be an integer >= 1")
    if images is not None and len(images) != len(samples):
        raise ValueError(f"got {len(images)} images for {len(samples)} samples")
    hits = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch_images = [s.image() for s in chunk] if images is None else images[start : start + batch_size]
        questions = [s.question for s in chunk]
        if skip_blocks is None:
            out = vlm.answer_with_knobs(batch_images, questions, knobs)
        else:
            out = vlm.generate_skipping(batch_images, questions, skip_blocks)
        hits += [answer == s.answer for answer, s in zip(out.answers, chunk)]
    return torch.tensor(hits, dtype=torch.bool)


def accuracy(vlm, samples: Sequence[VQASample], knobs: KnobConfig | None = None, **kwargs) -> float:
    """The share of ``samples`` answered exactly right (``correct_answers``' arguments)."""
    if not samples:
        raise ValueError("samples is empty: accuracy needs at least one question")
    return _share(correct_answers(vlm, samples, knobs, **kwargs))


def family_accuracy(samples: Sequence[VQASample], correct: torch.Tensor) -> dict[str, float]:
    """Accuracy overall (``all``) and per question family (NaN for a family with no sample).

    Args:
        samples: the N questions.
        correct: (N,) bool, e.g. from ``correct_answers``.
    """
    if len(correct) != len(samples) or not samples:
        raise ValueError(f"got {len(correct)} results for {len(samples)} samples: need one per sample, at least one")
    result = {"all": _share(correct)}
    for family in FAMILIES:
        rows = [i for i, s in enumerate(samples) if s.family == family]
        result[family] = _share(correct[rows]) if rows else float("nan")
    return result


def _share(correct: torch.Tensor) -> float:
    # Counted in Python ints: the exact fraction, as a float, whatever the tensor's dtype.
    return int(correct.sum()) / len(correct)
