"""The block-importance ranking that decides which blocks ``num_active_blocks`` drops.

As in the original system: a block's score is the validation accuracy lost when that
block alone is removed (everything else at the full configuration). Blocks with the
smallest drop go first. Block 0 is scored too, for the plots, but is never dropped.
"""

from __future__ import annotations

import torch

from .accuracy import accuracy
from .data import VQASample
from .vlm import KnobVLM


def accuracy_with_skipped(
    vlm: KnobVLM, samples: list[VQASample], images: list[torch.Tensor], skip: list[int], batch_size: int = 64
) -> float:
    """Accuracy of greedy answers at the full configuration with the blocks ``skip`` removed."""
    return accuracy(vlm, samples, skip_blocks=skip, images=images, batch_size=batch_size)


def block_importance(vlm: KnobVLM, samples: list[VQASample], batch_size: int = 64, progress: bool = True) -> dict:
    """Score every block by the accuracy drop when it alone is removed.

    Returns a dict with ``full_accuracy``, ``importance`` (L floats, accuracy points
    lost, higher = more important) and ``drop_order`` (blocks >= 1, least important first).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("block_importance needs at least one validation sample")
    images = [s.image() for s in samples]
    full = accuracy_with_skipped(vlm, samples, images, [], batch_size)
    importance = []
    for block in tqdm(range(vlm.num_layers), desc="blocks", disable=not progress):
        importance.append(full - accuracy_with_skipped(vlm, samples, images, [block], batch_size))
    order = sorted(range(1, vlm.num_layers), key=lambda b: (importance[b], -b))
    return {"full_accuracy": full, "importance": importance, "drop_order": order}
