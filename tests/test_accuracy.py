"""knoblib.accuracy: one loop that scores greedy answers, shared by pretraining, the block ranking and the ablations."""

import dataclasses
import math

import pytest
import torch

from knoblib.accuracy import accuracy, correct_answers, family_accuracy
from knoblib.data import FAMILIES
from knoblib.importance import accuracy_with_skipped, block_importance
from knoblib.knobs import KnobConfig

KNOBS = KnobConfig("medium", 2, 3, 7)


@pytest.fixture(scope="module")
def graded(tiny_vlm, samples):
    """The eight val samples with their answers set so that exactly rows 0, 3, 4 and 6 are right under KNOBS."""
    said = [tiny_vlm.answer_with_knobs([s.image()], [s.question], KNOBS).answers[0] for s in samples]
    right = {0, 3, 4, 6}
    return [
        dataclasses.replace(s, answer=a if i in right else f"not {a}") for i, (s, a) in enumerate(zip(samples, said))
    ]


def test_correct_answers_compares_each_answer_across_batches(tiny_vlm, graded):
    expected = [i in {0, 3, 4, 6} for i in range(len(graded))]
    images = [s.image() for s in graded]
    for kwargs in ({}, {"images": images}, {"images": torch.stack(images)}):
        for batch_size in (1, 3, 64):
            correct = correct_answers(tiny_vlm, graded, KNOBS, batch_size=batch_size, **kwargs)
            assert correct.dtype == torch.bool and correct.tolist() == expected, (kwargs.keys(), batch_size)
    assert accuracy(tiny_vlm, graded, KNOBS, batch_size=3) == 4 / 8


def test_skip_blocks_scores_generate_skipping(tiny_vlm, samples):
    said = tiny_vlm.generate_skipping([s.image() for s in samples], [s.question for s in samples], [0, 3]).answers
    graded = [dataclasses.replace(s, answer=a) for s, a in zip(samples, said)]
    assert correct_answers(tiny_vlm, graded, skip_blocks=[0, 3], batch_size=3).all()
    images = [s.image() for s in graded]
    assert accuracy_with_skipped(tiny_vlm, graded, images, [0, 3], batch_size=3) == 1.0
    assert accuracy_with_skipped(tiny_vlm, graded, images, []) == accuracy(tiny_vlm, graded)


def test_family_accuracy_counts_each_family(graded):
    correct = torch.tensor([True, False, False, True, True, False, True, False])
    result = family_accuracy(graded, correct)
    assert set(result) == {"all", *FAMILIES} and result["all"] == 0.5
    for family in FAMILIES:
        rows = [c for s, c in zip(graded, correct.tolist()) if s.family == family]
        assert result[family] == sum(rows) / len(rows)
    only_first = family_accuracy(graded[:1], correct[:1])
    assert only_first[graded[0].family] == 1.0
    assert all(math.isnan(v) for f, v in only_first.items() if f not in ("all", graded[0].family))


def test_bad_arguments_raise(tiny_vlm, graded):
    with pytest.raises(ValueError, match="knobs or skip_blocks"):
        correct_answers(tiny_vlm, graded, KNOBS, skip_blocks=[1])
    with pytest.raises(ValueError, match="batch_size=0"):
        correct_answers(tiny_vlm, graded, batch_size=0)
    with pytest.raises(ValueError, match="3 images for 8 samples"):
        correct_answers(tiny_vlm, graded, images=[s.image() for s in graded[:3]])
    with pytest.raises(ValueError, match="samples is empty"):
        accuracy(tiny_vlm, [])
    with pytest.raises(ValueError, match="one per sample"):
        family_accuracy(graded, torch.ones(3, dtype=torch.bool))


def test_block_importance_scores_every_block(tiny_vlm, samples):
    result = block_importance(tiny_vlm, samples, batch_size=4, progress=False)
    images = [s.image() for s in samples]
    assert result["full_accuracy"] == accuracy(tiny_vlm, samples)
    assert len(result["importance"]) == tiny_vlm.num_layers
    for block in (0, 5):
        skipped = accuracy_with_skipped(tiny_vlm, samples, images, [block])
        assert result["importance"][block] == result["full_accuracy"] - skipped
    assert sorted(result["drop_order"]) == list(range(1, tiny_vlm.num_layers))
