"""Per-sample correctness: which configurations answer each question right.

One boolean per (question, configuration), measured by running the VLM: everything else
about accuracy follows from it, without running the model again:

* per-configuration accuracy, overall and per family (``Correctness.accuracy``, the
  lookup table's ranking);
* the per-request oracle (the cheapest configuration that answers a question right) and
  the static front of configurations on the accuracy / latency plane (``knoblib.plane``);
* the warm start of the controller on the training split (``JointGRPOTrainer.fit_to_correctness``),
  which a user can compute on their own data: it needs answers, not family labels.

Saved as safetensors (a uint8 matrix) with the split, the sample uids and the
configurations in its metadata: ``python -m knoblib correctness --split val``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import FAMILIES, VQASample
from .knobs import KnobConfig

FORMAT = "knoblib-correctness"
COMMAND = "python -m knoblib correctness"


@dataclass
class Correctness:
    """Which configurations answer each question right.

    Attributes:
        correct: (S, C) bool, row s = ``uids[s]``, column c = ``configs[c]``.
        uids: the samples' uids, in row order.
        families: each sample's question family (for analysis only; a served controller never sees it).
        configs: the configurations, in column order.
        split: the split the samples come from.
    """

    correct: torch.Tensor
    uids: list[str]
    families: list[str]
    configs: list[KnobConfig]
    split: str

    def __post_init__(self) -> None:
        if self.correct.dtype != torch.bool or self.correct.dim() != 2:
            raise ValueError(f"correct must be a 2-D bool tensor, got {self.correct.dtype} {tuple(self.correct.shape)}")
        if self.correct.shape != (len(self.uids), len(self.configs)) or len(self.families) != len(self.uids):
            raise ValueError(
                f"correct has shape {tuple(self.correct.shape)} for {len(self.uids)} samples, "
                f"{len(self.families)} families and {len(self.configs)} configurations"
            )
        self._column = {k: i for i, k in enumerate(self.configs)}
        self._row = {u: i for i, u in enumerate(self.uids)}

    def __len__(self) -> int:
        return len(self.uids)

    def column(self, knobs: KnobConfig) -> int:
        try:
            return self._column[knobs]
        except KeyError:
            raise KeyError(f"configuration {knobs.short()} was not measured ({len(self.configs)} were)") from None

    def row(self, uid: str) -> int:
        try:
            return self._row[uid]
        except KeyError:
            raise KeyError(f"sample {uid!r} is not in this {self.split} correctness table ({len(self)} samples)") from None

    def accuracy(self) -> dict[KnobConfig, dict[str, float]]:
        """Per configuration: accuracy over all samples (``all``) and per family (NaN for an absent family)."""
        result = {}
        family_rows = {f: [i for i, g in enumerate(self.families) if g == f] for f in FAMILIES}
        for c, knobs in enumerate(self.configs):
            column = self.correct[:, c].float()
            row = {"all": float(column.mean())}
            for family, rows in family_rows.items():
                row[family] = float(column[rows].mean()) if rows else float("nan")
            result[knobs] = row
        return result

    def save(self, path: str | Path) -> Path:
        """Write the table atomically (safetensors; the metadata names split, uids, families and configurations)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": FORMAT,
            "split": self.split,
            "uids": json.dumps(self.uids),
            "families": json.dumps(self.families),
            "configs": json.dumps([k.as_dict() for k in self.configs]),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"correct": self.correct.to(torch.uint8).contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Correctness":
        """Read a table written by :meth:`save`; errors name the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"correctness table not found: {path}; make it with `{COMMAND}`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"corrupt correctness table {path}: {err}; remake it with `{COMMAND}`") from err
        if metadata.get("format") != FORMAT or "correct" not in tensors:
            raise ValueError(f"{path} is not a knoblib correctness table (format {metadata.get('format')!r})")
        try:
            configs = [KnobConfig(**row) for row in json.loads(metadata["configs"])]
            return cls(
                correct=tensors["correct"].bool(),
                uids=json.loads(metadata["uids"]),
                families=json.loads(metadata["families"]),
                configs=configs,
                split=metadata["split"],
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"corrupt correctness table {path}: {err}; remake it with `{COMMAND}`") from err


@torch.no_grad()
def measure_correctness(
    vlm,
    samples: Sequence[VQASample],
    configs: Sequence[KnobConfig] | None = None,
    split: str = "",
    batch_size: int = 100,
    progress: bool = True,
) -> Correctness:
    """Greedy exact-match correctness of every configuration (default: the whole knob space) on ``samples``."""
    from tqdm.auto import tqdm

    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty: measure at least one question")
    configs = list(vlm.knob_space) if configs is None else [vlm.knob_space.validate(k) for k in configs]
    from .accuracy import correct_answers

    images = [s.image() for s in samples]
    columns = [
        correct_answers(vlm, samples, knobs, images=images, batch_size=batch_size)
        for knobs in tqdm(configs, desc="configurations", disable=not progress)
    ]
    correct = torch.stack(columns, dim=1)
    return Correctness(correct, [s.uid for s in samples], [s.family for s in samples], configs, split)
