"""``python -m knoblib train`` end to end on the shipped model: the warm start and its guards."""

import json

import pytest

from knoblib.__main__ import main


def test_train_command_warm_starts_mode_b(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--mode", "B", "--steps", "1", "--warm-start-steps", "3", "--warm-start-teacher", "family-table", "--kl-coef", "0.05", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "warm start: 3 behaviour-cloning steps on the family-table teacher" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1] and all("val_accuracy" in row for row in rows)
    assert (out / "last" / "trainer_state.pt").is_file()
    # A second fresh run into the same folder is refused (nothing saved is overwritten).
    with pytest.raises(FileExistsError, match="--resume"):
        main(["train", "--mode", "B", "--steps", "1", "--warm-start-steps", "3", "--out", str(out)])


def test_train_command_refuses_a_mode_a_warm_start(tmp_path):
    with pytest.raises(ValueError, match="warm_start_steps=3 needs mode 'B'"):
        main(["train", "--mode", "A-resumable", "--steps", "1", "--warm-start-steps", "3", "--out", str(tmp_path / "a")])
