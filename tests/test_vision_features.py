"""Vision statistics for the vision-aware Mode B: what they are, and reusing the vision features."""

import pytest
import torch

from knoblib.vision_features import (
    reuse_image_features,
    vision_dim,
    vision_statistics,
    vision_statistics_all_tiers,
)
from knoblib.vlm import make_crops, tier_num_crops


def test_statistics_are_the_mean_and_std_of_each_rows_image_tokens(tiny_vlm, samples):
    images = [s.image() for s in samples[:3]]
    tiers = ["low", "high", "medium"]
    stats = vision_statistics(tiny_vlm, images, tiers)
    d = tiny_vlm.hidden_size
    assert stats.shape == (3, vision_dim(d)) == (3, 2 * d) and stats.dtype == torch.float32
    for row, (image, tier) in enumerate(zip(images, tiers)):
        with torch.no_grad():
            out = tiny_vlm.model.model.get_image_features(pixel_values=make_crops(image, tier), return_dict=True)
        tokens = torch.cat(list(out.pooler_output))  # the projector output the LLM reads for this image
        assert tokens.shape == (tier_num_crops(tier) * tiny_vlm.tokens_per_crop, d)
        torch.testing.assert_close(stats[row, :d], tokens.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[row, d:], tokens.std(0, unbiased=False), rtol=1e-5, atol=1e-6)
    every = vision_statistics_all_tiers(tiny_vlm, images)
    assert every.shape == (3, 3, 2 * d)
    for t, tier in enumerate(tiny_vlm.knob_space.tiers):
        torch.testing.assert_close(every[:, t], vision_statistics(tiny_vlm, images, [tier] * 3), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(tiny_vlm, samples):
    image = samples[0].image()
    with pytest.raises(ValueError, match="tier='huge' is invalid"):
        vision_statistics(tiny_vlm, [image], ["huge"])
    with pytest.raises(ValueError, match="one tier per image"):
        vision_statistics(tiny_vlm, [image, image], ["low"])
    with pytest.raises(ValueError, match="empty"):
        vision_statistics(tiny_vlm, [], [])


def test_the_generate_that_follows_reuses_the_vision_features(tiny_vlm, samples):
    """Within ``reuse_image_features`` the vision tower runs once for the statistics and the generate
    (counted with a forward hook on the tower), and the answers do not change."""
    rows = samples[:4]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    space = tiny_vlm.knob_space
    knobs = [space.cheapest(), space.full(), space.full(), space.cheapest()]
    tiers = [k.tier for k in knobs]
    calls = []
    hook = tiny_vlm.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        plain = tiny_vlm.generate(images, questions, knobs, 2)
        assert len(calls) == 1
        calls.clear()
        vision_statistics(tiny_vlm, images, tiers)
        tiny_vlm.generate(images, questions, knobs, 2)
        assert len(calls) == 2  # computed twice without the cache
        calls.clear()
        with reuse_image_features(tiny_vlm) as reuse:
            stats = vision_statistics(tiny_vlm, images, tiers)
            reused = tiny_vlm.generate(images, questions, knobs, 2)
            assert len(calls) == 1 and reuse["hits"] == 1
            # Other tiers are other crops: never served stale features.
            tiny_vlm.generate(images, questions, [space.full()] * 4, 2)
            assert len(calls) == 2 and reuse["hits"] == 1
        assert torch.equal(plain.sequences, reused.sequences) and plain.answers == reused.answers
        torch.testing.assert_close(stats, vision_statistics(tiny_vlm, images, tiers))
    finally:
        hook.remove()
    # The model is as it was after the block (the class's method again), also after an error.
    assert "get_image_features" not in vars(tiny_vlm.model.model)
    with pytest.raises(RuntimeError, match="boom"):
        with reuse_image_features(tiny_vlm):
            raise RuntimeError("boom")
    assert "get_image_features" not in vars(tiny_vlm.model.model)
