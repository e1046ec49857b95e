"""Per-sample correctness: measured against generate, saved and loaded, and the accuracies it implies."""

import pytest
import torch

from knoblib.correctness import Correctness, measure_correctness
from knoblib.knobs import KnobConfig


@pytest.fixture(scope="module")
def measured(tiny_vlm, samples):
    configs = [tiny_vlm.knob_space.full(), tiny_vlm.knob_space.cheapest(), KnobConfig("medium", 2, 3, 7)]
    return measure_correctness(tiny_vlm, samples, configs, split="val", batch_size=3, progress=False)


def test_correctness_is_what_generate_answers(tiny_vlm, samples, measured):
    for c, knobs in enumerate(measured.configs):
        answers = [tiny_vlm.generate([s.image()], [s.question], knobs).answers[0] for s in samples]
        assert measured.correct[:, c].tolist() == [a == s.answer for a, s in zip(answers, samples)]
    assert measured.uids == [s.uid for s in samples] and measured.families == [s.family for s in samples]


def test_accuracy_per_family(measured, samples):
    accuracy = measured.accuracy()
    for c, knobs in enumerate(measured.configs):
        assert accuracy[knobs]["all"] == pytest.approx(float(measured.correct[:, c].float().mean()))
        for family in {s.family for s in samples}:
            rows = [i for i, s in enumerate(samples) if s.family == family]
            assert accuracy[knobs][family] == pytest.approx(float(measured.correct[rows, c].float().mean()))


def test_save_load_round_trip_and_bad_files(measured, tmp_path):
    path = measured.save(tmp_path / "c.safetensors")
    loaded = Correctness.load(path)
    assert torch.equal(loaded.correct, measured.correct) and loaded.configs == measured.configs
    assert loaded.uids == measured.uids and loaded.split == "val"
    assert loaded.row(measured.uids[2]) == 2 and loaded.column(measured.configs[1]) == 1
    with pytest.raises(KeyError, match="not in this val correctness table"):
        loaded.row("nope")
    with pytest.raises(FileNotFoundError, match="python -m knoblib correctness"):
        Correctness.load(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"corrupt correctness table {broken}"):
        Correctness.load(broken)
    with pytest.raises(ValueError, match="shape"):
        Correctness(torch.zeros(2, 3, dtype=torch.bool), ["a"], ["color"], measured.configs, "val")
