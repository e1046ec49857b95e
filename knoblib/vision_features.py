"""Cheap statistics of the vision features, for the vision-aware Mode-B Stage 2.

Mode B decides every knob before the language model runs, from the question's words and
the budget; it never sees the image. Mode A sees the image through the latency token, but
only after the model has run to block p. In between lies the vision tower: it runs before
the language model anyway, and once Stage 1 has chosen the tier, its output at that tier
is known without any language-model block. The vision-aware Mode B
(``ControllerConfig.vision_stats``) gives Stage 2 two statistics of it:

* the mean over the row's image tokens of the projector output (d values: what the
  language model receives in place of the ``<image>`` tokens);
* their standard deviation over the same tokens (d values).

So ``vision_feat`` is (N, 2 d). The statistics are computed from
``get_image_features`` of the transformers model, the call ``KnobVLM.embed`` makes.

**Computed twice, or reused.** Stage 2 needs the features before ``generate`` runs,
and ``generate`` computes them again unless told otherwise. :func:`reuse_image_features`
is a one-entry cache around ``get_image_features`` for the duration of a ``with`` block:
the statistics' call stores its result, and the ``generate`` that follows (same images,
same tiers, hence identical crops) gets it back instead of running the vision tower a
second time. The answers are the same either way (``tests/test_variants.py``), and
``python -m knoblib evaluate --variants`` measures what each way costs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from .knobs import TIERS
from .vlm import KnobVLM, make_crops, tier_num_crops

STATISTICS = ("mean", "std")


def vision_dim(hidden_size: int) -> int:
    """Width of ``vision_feat`` for a VLM of this hidden size: one mean and one std per channel."""
    return len(STATISTICS) * int(hidden_size)


def pixel_values(vlm: KnobVLM, images: Sequence[torch.Tensor], tiers: Sequence[str]) -> torch.Tensor:
    """The crops of each row at its tier, concatenated in row order (as ``KnobVLM.build_inputs`` cuts them)."""
    if len(images) != len(tiers):
        raise ValueError(f"got {len(images)} images and {len(tiers)} tiers: give one tier per image")
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    return torch.cat([make_crops(image, tier) for image, tier in zip(images, tiers)]).to(vlm.device)


def image_features(vlm: KnobVLM, values: torch.Tensor):
    """``get_image_features`` of the transformers model, called as ``KnobVLM.embed`` calls it."""
    return vlm.model.model.get_image_features(pixel_values=values, return_dict=True)


@torch.no_grad()
def vision_statistics(vlm: KnobVLM, images: Sequence[torch.Tensor], tiers: Sequence[str]) -> torch.Tensor:
    """``vision_feat`` (N, 2 d) float32: per row, the mean and the std over its image tokens of the
    projector output at its tier (``tiers``: one of ``knoblib.knobs.TIERS`` per row).

    One vision-tower call for the whole batch (the crops of every row together), as ``generate``
    makes it, so inside :func:`reuse_image_features` the ``generate`` that follows reuses it.
    """
    for tier in tiers:
        if tier not in TIERS:
            raise ValueError(f"tier={tier!r} is invalid: allowed {list(TIERS)}")
    features = torch.cat(list(image_features(vlm, pixel_values(vlm, images, tiers)).pooler_output), dim=0).float()
    counts = [tier_num_crops(tier) * vlm.tokens_per_crop for tier in tiers]
    rows = torch.split(features, counts)
    # unbiased=False: the low tier has 4 tokens, and the statistic describes them, it does not estimate anything.
    return torch.stack([torch.cat([r.mean(0), r.std(0, unbiased=False)]) for r in rows])


@torch.no_grad()
def vision_statistics_all_tiers(vlm: KnobVLM, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``vision_feat`` at every tier: (N, T, 2 d), tier axis in ``vlm.knob_space.tiers`` order.

    For the paths that score every configuration at once (``TwoStageController.joint_log_probs``,
    greedy choices on the plane); a served request computes only its own tier's.
    """
    tiers = vlm.knob_space.tiers
    n = len(images)
    flat = vision_statistics(vlm, [image for image in images for _ in tiers], [t for _ in range(n) for t in tiers])
    return flat.view(n, len(tiers), -1)


@contextmanager
def reuse_image_features(vlm: KnobVLM):
    """Within the block, a ``get_image_features`` call with the same crops as the previous one
    returns the previous result instead of running the vision tower again.

    One entry (the last call): :func:`vision_statistics` for a batch, then ``vlm.generate`` on
    the same images at the same tiers. The cache compares the crops themselves
    (``torch.equal``), so different images or tiers are never served stale features. The
    model is restored when the block ends, also on an error.
    """
    inner = vlm.model.model
    original = inner.get_image_features
    last: dict = {}

    def cached(pixel_values=None, **kwargs):
        key = (pixel_values, tuple(sorted(kwargs.items())))
        hit = last.get("entry")
        if hit is not None and hit[0][1] == key[1] and hit[0][0].shape == pixel_values.shape and torch.equal(hit[0][0], pixel_values):
            last["hits"] = last.get("hits", 0) + 1
            return hit[1]
        out = original(pixel_values=pixel_values, **kwargs)
        last["entry"] = (key, out)
        return out

    inner.get_image_features = cached
    try:
        yield last
    finally:
        # The instance attribute goes; the class's method is found again.
        del inner.get_image_features
