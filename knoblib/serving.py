"""Serving under a latency budget, by the wall clock of this machine.

``BudgetedVLM`` is the one-call API::

    from knoblib import BudgetedVLM

    served = BudgetedVLM.from_pretrained()          # shipped model + Mode-B controller + this machine's table
    for a in served.answer([image], ["what color is the shape ?"], budget_ms=30.0):
        print(a.text, a.knobs.short(), f"{a.latency_ms:.1f} ms")

Each request is served on its own (batch 1): the controller decides the four knobs from
the question and the budget, the VLM answers with them, and ``latency_ms`` is the wall
clock of both. What keeps that wall clock inside the budget:

* the latency table is this machine's (``knoblib.calibration``: profiled here when the
  shipped one does not hold);
* the budget guard reads each configuration at a tail quantile (p95 by default), not
  its median;
* the time the decision itself takes is measured when the server starts and reserved
  out of every budget (``reserve_ms``);
* answers decode at most the table's ``answer_tokens``, the length every configuration
  was timed with;
* a budget above the full configuration's latency is served by the full configuration.

The controller sees the budget relative to this machine's full-configuration latency, so
the same controller means the same thing on a machine 4x slower or faster.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .evaluate import ControllerPolicy, FullModelPolicy
from .guard import DEFAULT_QUANTILE
from .knobs import KnobConfig
from .latency import LatencyTable, check_budgets
from .vlm import IMAGE_SIZE, KnobVLM, check_image

MODES = ("A", "B")


def load_image(image) -> torch.Tensor:
    """A request's image as the uint8 tensor (3, 48, 48) the VLM reads.

    Accepts a path to an image file (PNG, JPEG, ...; read with Pillow), a ``PIL.Image``,
    a numpy array (48, 48, 3) uint8, or a torch uint8 tensor (3, 48, 48). Anything else,
    a missing or unreadable file, or another size raises an error that names the problem.
    """
    if isinstance(image, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
                image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read an image from {path}: {err}") from err
    if type(image).__module__.startswith("PIL"):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"image is {image.size[0]}x{image.size[1]} pixels: this model reads {IMAGE_SIZE}x{IMAGE_SIZE} RGB images"
            )
        import numpy as np

        image = np.asarray(image)
    if type(image).__module__ == "numpy":
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image array has shape {tuple(image.shape)}: expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) RGB")
        if str(image.dtype) != "uint8":
            raise ValueError(f"image array has dtype {image.dtype}: expected uint8 (0..255 RGB)")
        image = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a file path, a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
        )
    check_image(image)
    return image


@dataclass
class Answer:
    """One served request.

    Attributes:
        text: the model's answer.
        knobs: the configuration it ran with.
        latency_ms: measured wall clock of the controller's decision plus the VLM's work.
        budget_ms: the request's budget (None when served for a target mean latency).
        decision_ms: the controller's share of ``latency_ms`` (Mode B; in Mode A Stage 2
            runs inside the forward and is part of the VLM's time).
        table_latency_ms: the chosen configuration's median latency in this machine's table.
        unknown_words: words of the question the model's vocabulary does not know (they
            reach the model as ``<unk>``; the answer may be wrong).
    """

    text: str
    knobs: KnobConfig
    latency_ms: float
    budget_ms: float | None
    decision_ms: float
    table_latency_ms: float
    unknown_words: list[str] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        """Whether the measured wall clock broke the budget."""
        return self.budget_ms is not None and self.latency_ms > self.budget_ms

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "knobs": self.knobs.as_dict(),
            "latency_ms": round(self.latency_ms, 3),
            "budget_ms": self.budget_ms,
            "over_budget": self.over_budget,
            "decision_ms": round(self.decision_ms, 3),
            "table_latency_ms": round(self.table_latency_ms, 3),
            "unknown_words": list(self.unknown_words),
        }


def decision_cost(policy) -> callable:
    """What ``policy`` runs outside the VLM for one request, as ``f(question, budget_ms)`` (for timing)."""
    if isinstance(policy, ControllerPolicy):
        return lambda question, budget_ms: policy.decide(question, budget_ms)
    return lambda question, budget_ms: policy.choose_one(budget_ms)


def measure_reserve(policy, questions: Sequence[str], budgets_ms: Sequence[float], repeats: int = 3, quantile: float = 0.95) -> float:
    """The ``quantile`` of the time (ms) ``policy`` takes to decide, over questions x budgets x repeats.

    That much of every budget is reserved for the decision, so the configuration chosen
    is checked against what is left.
    """
    run = decision_cost(policy)
    run(questions[0], budgets_ms[0])  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        for question in questions:
            for budget in budgets_ms:
                start = time.perf_counter()
                run(question, budget)
                times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return times[min(len(times) - 1, int(quantile * len(times)))]


def serve_timed(policy, vlm: KnobVLM, image: torch.Tensor, question: str, budget_ms: float, answer_tokens: int):
    """Serve one request with ``policy``: (answer, knobs, wall-clock ms of decision + VLM)."""
    start = time.perf_counter()
    text, knobs = policy.serve_one(vlm, image, question, budget_ms, answer_tokens)
    return text, knobs, (time.perf_counter() - start) * 1000.0


class BudgetedVLM:
    """A VLM served under per-request latency budgets by a trained two-stage controller.

    Args:
        vlm: the ``KnobVLM``.
        controller: a trained ``TwoStageController`` (Mode A or B).
        table: this machine's latency table (``knoblib.assets.latency_table``).
        quantile: the latency quantile the budget guard holds each configuration to.
        reserve_ms: budget kept for the decision; None measures it now.
    """

    def __init__(
        self,
        vlm: KnobVLM,
        controller,
        table: LatencyTable,
        quantile: float = DEFAULT_QUANTILE,
        reserve_ms: float | None = None,
    ) -> None:
        table.check_space(vlm.knob_space)
        self.vlm = vlm.eval()
        self.table = table
        self.quantile = float(quantile)
        self.policy = ControllerPolicy(controller, vlm, table=table, quantile=quantile)
        self.full = FullModelPolicy(vlm.knob_space)
        self.full_ms = table.latency(vlm.knob_space.full(), quantile)
        if reserve_ms is None:
            questions = ["what color is the shape ?", "how many red shapes are there ?"]
            budgets = [0.75 * table.reference_ms, table.reference_ms]
            reserve_ms = measure_reserve(self.policy, questions, budgets)
        self.policy.reserve_ms = float(reserve_ms)

    @property
    def mode(self) -> str:
        return self.policy.controller.config.mode

    @property
    def controller(self):
        return self.policy.controller

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        mode: str = "B",
        table: str | Path | LatencyTable = "local",
        quantile: float = DEFAULT_QUANTILE,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        log=print,
    ) -> "BudgetedVLM":
        """Load a VLM, its controller and this machine's latency table.

        Args:
            path: a folder holding ``model/``, ``controller_A/``, ``controller_B/`` (and
                ``latency_table.json``, the table shipped with them), laid out like the
                repository's ``data/``; default: the shipped ``data/``.
            mode: ``"B"`` (every knob chosen before the model runs; the default) or ``"A"``
                (Stage 2 reads the latency token at the pause of a resumable forward).
            table: ``"local"`` (this machine's table: cached, the shipped one if a spot
                check agrees, else profiled now; see ``knoblib.calibration``), ``"shipped"``,
                a path, or a ``LatencyTable``.
            quantile, cache_dir, progress, log: see ``BudgetedVLM`` and the calibration.
        """
        from .assets import latency_table
        from .controller import TwoStageController
        from .data import data_path

        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: allowed {list(MODES)}")
        root = Path(path) if path is not None else data_path()
        if not root.is_dir():
            raise FileNotFoundError(f"no served-model folder at {root}: expected model/ and controller_{mode}/ inside")
        vlm = KnobVLM.from_pretrained(root / "model")
        if table == "local" and path is not None:
            from .calibration import local_latency_table
            from .assets import CALIBRATION_SAMPLES, load_samples

            shipped_file = root / "latency_table.json"
            shipped = LatencyTable.load(shipped_file) if shipped_file.is_file() else None
            table = local_latency_table(
                vlm, shipped, load_samples("test", CALIBRATION_SAMPLES), cache_dir=cache_dir, progress=progress, log=log
            )
        else:
            table = latency_table(vlm, table, cache_dir=cache_dir, progress=progress, log=log)
        controller = TwoStageController.load(
            root / f"controller_{mode}", expected_space=vlm.knob_space, expected_mode=mode,
            expected_latency_dim=vlm.hidden_size,
        )
        return cls(vlm, controller, table, quantile=quantile)

    def answer(
        self,
        images: Sequence,
        questions: Sequence[str],
        budget_ms: float | Sequence[float],
    ) -> list[Answer]:
        """Serve each request on its own under its budget; one ``Answer`` per request, in order.

        Args:
            images: one image per request (see :func:`load_image` for the accepted kinds).
            questions: one question (str) per request.
            budget_ms: one budget in milliseconds for all requests, or one per request;
                each finite and > 0.
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings, one per request: wrap a single question in a list")
        if isinstance(images, (str, Path, torch.Tensor)) or type(images).__module__.startswith(("PIL", "numpy")):
            raise TypeError("images must be a list, one per request: wrap a single image in a list")
        images, questions = list(images), list(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images and {len(questions)} questions: give one of each per request")
        if not questions:
            raise ValueError("no requests: give at least one image and question")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty or not a string: {q!r}")
        if isinstance(budget_ms, (int, float)) and not isinstance(budget_ms, bool):
            budgets = check_budgets([float(budget_ms)] * len(questions))
        else:
            budgets = check_budgets(list(budget_ms) if not isinstance(budget_ms, torch.Tensor) else budget_ms)
            if len(budgets) != len(questions):
                raise ValueError(f"got {len(budgets)} budgets for {len(questions)} requests: give one, or one per request")
        pixels = [load_image(image) for image in images]
        answers = []
        for image, question, budget in zip(pixels, questions, budgets.tolist()):
            answers.append(self._serve(image, question, budget))
        return answers

    def _serve(self, image: torch.Tensor, question: str, budget_ms: float) -> Answer:
        unknown = self.vlm.unknown_words(question) if hasattr(self.vlm, "unknown_words") else []
        # Above what the full configuration needs, nothing is gained by deciding: serve it.
        policy = self.full if budget_ms > self.full_ms + self.policy.reserve_ms else self.policy
        start = time.perf_counter()
        text, knobs = policy.serve_one(self.vlm, image, question, budget_ms, self.table.answer_tokens)
        total_ms = (time.perf_counter() - start) * 1000.0
        return Answer(
            text=text,
            knobs=knobs,
            latency_ms=total_ms,
            budget_ms=float(budget_ms),
            decision_ms=getattr(policy, "last_decision_ms", 0.0),
            table_latency_ms=self.table.latency(knobs),
            unknown_words=unknown,
        )
