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
* the budget guard reads each configuration at a tail quantile (p99 by default), not
  its median;
* the time the decision itself takes is measured when the server starts and reserved
  out of every budget (``reserve_ms``);
* every served request is also a measurement: ``LatencyMonitor`` follows how much
  slower (or faster) than its table the machine runs now, and budgets are scaled by it;
* answers decode at most the table's ``answer_tokens``, the length every configuration
  was timed with;
* a budget above the full configuration's latency is served by the full configuration.

The controller sees the budget relative to this machine's full-configuration latency, so
the same controller means the same thing on a machine 4x slower or faster.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .controller import CONTROLLER_MODES
from .evaluate import ControllerPolicy, FullModelPolicy
from .guard import DEFAULT_QUANTILE
from .knobs import KnobConfig
from .latency import LatencyTable, check_budgets, serving_threads
from .vlm import IMAGE_SIZE, KnobVLM, check_image


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
        price: the latency price it was served at (0 under a per-request budget).
    """

    text: str
    knobs: KnobConfig
    latency_ms: float
    budget_ms: float | None
    decision_ms: float
    table_latency_ms: float
    unknown_words: list[str] = field(default_factory=list)
    price: float = 0.0

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
            "price": self.price,
        }


def decision_cost(policy) -> callable:
    """What ``policy`` runs outside the VLM for one request, as ``f(question, budget_ms)`` (for timing)."""
    if isinstance(policy, ControllerPolicy):
        if getattr(policy.controller.config, "vision_stats", False):
            # The vision-aware Mode B also runs the vision tower on the chosen tier's crops:
            # time it on a blank image of the served shape (the work does not depend on the pixels).
            blank = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
            return lambda question, budget_ms: policy.decide(question, budget_ms, image=blank)
        return lambda question, budget_ms: policy.decide(question, budget_ms)
    return lambda question, budget_ms: policy.choose_one(budget_ms)


def measure_reserve(
    policy, questions: Sequence[str], budgets_ms: Sequence[float], repeats: int = 10, quantile: float = 0.5
) -> float:
    """The ``quantile`` (the median by default) of the time (ms) ``policy`` takes to decide,
    over questions x budgets x repeats.

    That much of every budget is reserved for the decision, so the configuration chosen
    is checked against what is left. Why the median and not a tail: the guard already
    holds the VLM's work to its p99, and the decision's spread (hundredths of a ms) is
    tiny beside the VLM's (ms), so the sum's tail is the VLM's tail plus the typical
    decision. A tail of a few dozen decisions is instead their largest, which one
    preemption of the process inflates tenfold (4.7 ms against a 0.44 ms median on a busy
    machine here) and which then costs every request of the server a tier.
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


# The tail at which the monitor compares recent requests with the profile (see ``Server``).
MONITOR_QUANTILE = 0.9


class LatencyMonitor:
    """How fast this machine runs *now*, from the requests it serves, against its latency table.

    Every served request is a free measurement: its VLM wall clock over the chosen
    configuration's median in the table. A shared 2-core machine drifts (another process,
    frequency, neighbours on a VM): the same configuration took 1.2x its profiled median
    half an hour after the profile, here. The monitor keeps the last ``window`` ratios
    and reports their ``quantile``: a machine whose recent tail is 1.3x the table's median,
    where the profile said 1.1x, is ``slowdown`` 1.18x slower than its table, and serving
    scales each budget down by that much before the guard reads the table. Until
    ``min_samples`` requests were seen it trusts the profile (``slowdown`` 1).

    Args:
        table: this machine's latency table.
        quantile: the tail the guard holds configurations to (one the table keeps).
        window: recent requests remembered.
        min_samples: requests needed before the measurements replace the profile.
    """

    def __init__(self, table: LatencyTable, quantile: float = DEFAULT_QUANTILE, window: int = 200, min_samples: int = 20):
        if window < min_samples or min_samples < 1:
            raise ValueError(f"window={window} and min_samples={min_samples} are invalid: need 1 <= min_samples <= window")
        self.table = table
        self.quantile = float(quantile)
        self.profiled = table.factor(quantile)
        self.ratios: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples

    def observe(self, knobs: KnobConfig, vlm_ms: float) -> None:
        """Record one request: the VLM's wall clock (ms) for ``knobs``."""
        self.ratios.append(vlm_ms / self.table.latency(knobs))

    @property
    def tail_factor(self) -> float:
        """The recent ``quantile`` of measured / table median (the profile's until enough requests)."""
        if len(self.ratios) < self.min_samples:
            return self.profiled
        ordered = sorted(self.ratios)
        return ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]

    @property
    def slowdown(self) -> float:
        """How much slower than its table this machine runs now, at the guarded tail (1 = as profiled)."""
        return self.tail_factor / self.profiled


class Server:
    """Serves one policy under per-request budgets, one request at a time, by the wall clock.

    What it adds to the policy, so that the wall clock keeps the budget:

    * ``reserve_ms``: the policy's own decision time (measured when the server starts),
      taken out of every budget before the guard reads the table;
    * ``monitor``: the machine's current speed against its table (``LatencyMonitor``, at
      ``MONITOR_QUANTILE``); the rest of the budget is divided by its ``slowdown``, so the
      policy chooses as if the machine ran exactly as profiled;
    * a budget above what the full configuration needs (at the guard's quantile) is
      served by the full configuration: nothing is left to decide.

    Args:
        vlm: the ``KnobVLM``.
        policy: anything with ``serve_one`` (``knoblib.evaluate``'s policies).
        table: this machine's latency table.
        quantile: the guard's quantile (the policy's own, for a policy that has one).
        reserve_ms: None measures it now (``measure_reserve``).
        monitor: follow the machine's drift (default True); or a ``LatencyMonitor`` to
            share: servers that compare policies on one machine should read one estimate
            of its drift (``evaluate --measured`` and ``benchmarks/bench_serving.py`` do).
            Two monitors fed different requests disagree by their sampling noise (about
            2 % at p90 of 200 requests), which is enough to move one policy across a
            configuration's threshold and not the other.
    """

    def __init__(
        self,
        vlm: KnobVLM,
        policy,
        table: LatencyTable,
        quantile: float = DEFAULT_QUANTILE,
        reserve_ms: float | None = None,
        monitor: "bool | LatencyMonitor" = True,
    ) -> None:
        self.vlm, self.policy, self.table = vlm, policy, table
        self.quantile = float(getattr(policy, "quantile", quantile))
        self.full = FullModelPolicy(vlm.knob_space)
        self.full_ms = table.latency(vlm.knob_space.full(), self.quantile)
        if reserve_ms is None:
            questions = [
                "what color is the shape ?", "how many red shapes are there ?",
                "what is the number of blue shapes ?", "which mark is in the picture ?",
            ]
            budgets = [0.65 * table.reference_ms, 0.8 * table.reference_ms, table.reference_ms]
            reserve_ms = measure_reserve(policy, questions, budgets)
        self.reserve_ms = float(reserve_ms)
        # The monitor reads the machine's drift at p90, not at the guard's p99: the p99 of its
        # 200 recent requests is their second largest, so one hiccup of the machine moved the
        # budgets of the next 200 requests (two servers on the same machine read 1.25x and 1.32x).
        # The guard still holds each configuration to the table's p99, scaled by this drift.
        if isinstance(monitor, LatencyMonitor):
            if monitor.table is not table:
                raise ValueError("a shared LatencyMonitor must follow the same latency table as the server")
            self.monitor = monitor
        else:
            self.monitor = self.new_monitor(table, self.quantile) if monitor else None

    @staticmethod
    def new_monitor(table: LatencyTable, quantile: float = DEFAULT_QUANTILE) -> LatencyMonitor:
        """A monitor as a server makes it: at ``MONITOR_QUANTILE`` when ``table`` keeps it, else ``quantile``."""
        return LatencyMonitor(table, MONITOR_QUANTILE if MONITOR_QUANTILE in table.quantiles else quantile)

    @property
    def name(self) -> str:
        return self.policy.name

    def budget_for_table(self, budget_ms: float) -> float:
        """What is left of ``budget_ms`` for the VLM, in the table's milliseconds."""
        slowdown = self.monitor.slowdown if self.monitor is not None else 1.0
        return max(budget_ms - self.reserve_ms, 1e-6) / slowdown

    def serve(
        self, image: torch.Tensor, question: str, budget_ms: float, answer_tokens: int | None = None, price: float = 0.0
    ):
        """(answer, knobs, wall-clock ms of decision + VLM, the decision's ms) for one request.

        ``budget_ms`` ``inf`` serves without a per-request budget (the average-latency mode,
        steered by ``price``).
        """
        answer_tokens = self.table.answer_tokens if answer_tokens is None else answer_tokens
        budget = self.budget_for_table(budget_ms) if math.isfinite(budget_ms) else math.inf
        # Above what the full configuration needs, nothing is gained by deciding: serve it.
        policy = self.full if math.isfinite(budget) and budget > self.full_ms else self.policy
        start = time.perf_counter()
        text, knobs = policy.serve_one(self.vlm, image, question, budget, answer_tokens, price)
        total_ms = (time.perf_counter() - start) * 1000.0
        decision_ms = getattr(policy, "last_decision_ms", 0.0) if policy is self.policy else 0.0
        if self.monitor is not None:
            self.monitor.observe(knobs, total_ms - decision_ms)
        return text, knobs, total_ms, decision_ms

    def warm_up(self, images: Sequence[torch.Tensor], questions: Sequence[str], requests: int = 5) -> None:
        """Serve a few requests first (the first calls of a process allocate and run slow); they also feed the monitor."""
        for i in range(requests):
            self.serve(images[i % len(images)], questions[i % len(questions)], self.table.reference_ms)


class BudgetedVLM:
    """A VLM served under per-request latency budgets by a trained two-stage controller.

    Args:
        vlm: the ``KnobVLM``.
        controller: a trained ``TwoStageController`` (Mode A or B).
        table: this machine's latency table (``knoblib.assets.latency_table``).
        quantile: the latency quantile the budget guard holds each configuration to.
        reserve_ms: budget kept for the decision; None measures it now.
        monitor: follow the machine's drift while serving (``LatencyMonitor``).
    """

    def __init__(
        self,
        vlm: KnobVLM,
        controller,
        table: LatencyTable,
        quantile: float = DEFAULT_QUANTILE,
        reserve_ms: float | None = None,
        monitor: bool = True,
    ) -> None:
        table.check_space(vlm.knob_space)
        self.vlm = vlm.eval()
        self.table = table
        self.quantile = float(quantile)
        self.policy = ControllerPolicy(controller, vlm, table=table, quantile=quantile)
        self.server = Server(vlm, self.policy, table, quantile, reserve_ms, monitor)

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
        table: str | Path | LatencyTable | None = None,
        quantile: float = DEFAULT_QUANTILE,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        log=print,
        threads: int | None = None,
    ) -> "BudgetedVLM":
        """Load a VLM, its controller and this machine's latency table, and warm the server up.

        Args:
            path: a folder holding ``model/``, ``controller_A/``, ``controller_B/`` (and
                ``latency_table.json``, the table shipped with them), laid out like the
                repository's ``data/``; default: the shipped ``data/``.
            mode: ``"B"`` (every knob chosen before the model runs; the default) or ``"A"``
                (Stage 2 reads the latency token at the pause of a resumable forward).
            table: ``"local"`` (the default: this machine's table: cached, the shipped one
                if a spot check agrees, else profiled now; see ``knoblib.calibration``),
                ``"shipped"``, a path, or a ``LatencyTable``.
            quantile, cache_dir, progress, log: see ``BudgetedVLM`` and the calibration.
            threads: torch's intra-op threads for this process (``latency.serving_threads``:
                None means ``$OMP_NUM_THREADS``, else 1, as for the command line). Set before
                the table is chosen, so the table and the serving use the same count.
        """
        from .assets import CALIBRATION_SAMPLES, TABLE_ENV, latency_table, load_samples
        from .controller import TwoStageController
        from .data import data_path

        if mode not in CONTROLLER_MODES:
            raise ValueError(f"mode={mode!r} is invalid: allowed {list(CONTROLLER_MODES)}")
        serving_threads(threads)
        root = Path(path) if path is not None else data_path()
        if not root.is_dir():
            raise FileNotFoundError(f"no served-model folder at {root}: expected model/ and controller_{mode}/ inside")
        vlm = KnobVLM.from_pretrained(root / "model")
        samples = load_samples("test", CALIBRATION_SAMPLES)
        if (table or os.environ.get(TABLE_ENV) or "local") == "local" and path is not None:
            from .calibration import local_latency_table

            shipped_file = root / "latency_table.json"
            shipped = LatencyTable.load(shipped_file) if shipped_file.is_file() else None
            table = local_latency_table(vlm, shipped, samples, cache_dir=cache_dir, progress=progress, log=log)
        else:
            table = latency_table(vlm, table, cache_dir=cache_dir, progress=progress, log=log)
        controller = TwoStageController.load(
            root / f"controller_{mode}", expected_space=vlm.knob_space, expected_mode=mode,
            expected_latency_dim=vlm.hidden_size,
        )
        served = cls(vlm, controller, table, quantile=quantile)
        served.server.warm_up([s.image() for s in samples], [s.question for s in samples])
        return served

    def price_for(self, target_mean_latency_ms: float, validation: int = 400) -> float:
        """The latency price at which this controller's mean latency on validation questions meets the target.

        Found by bisection (``knoblib.plane.find_price``) on the first ``validation``
        questions of the validation split, against this machine's table medians, and
        cached per target.
        """
        from .assets import load_samples
        from .plane import controller_choices, find_price

        controller = self.policy.controller
        if controller.config.max_price <= 0:
            raise ValueError(
                "this controller has no latency-price input (max_price=0): it serves per-request budgets only; "
                "train one with `python -m knoblib train --max-price 2 --average-fraction 0.5`"
            )
        target = float(check_budgets([target_mean_latency_ms])[0])
        cache = self.__dict__.setdefault("_prices", {})
        if target not in cache:
            samples = load_samples("val", validation)
            if self.mode == "B":

                def mean_latency(price: float) -> float:
                    decide = self.policy.decide
                    knobs = [self.policy.decider.knobs(*decide(s.question, math.inf, price=price)) for s in samples]
                    return float(self.table.latencies(knobs).mean())
            else:
                inf = torch.full((len(samples),), math.inf, dtype=torch.float64)

                def mean_latency(price: float) -> float:
                    prices = torch.full((len(samples),), price, dtype=torch.float64)
                    knobs = controller_choices(self.vlm, controller, samples, self.table, inf, prices, self.quantile)
                    return float(self.table.latencies(knobs).mean())

            cache[target] = find_price(mean_latency, target, controller.config.max_price, iterations=20)
        return cache[target]

    def answer(
        self,
        images: Sequence,
        questions: Sequence[str],
        budget_ms: float | Sequence[float] | None = None,
        target_mean_latency_ms: float | None = None,
    ) -> list[Answer]:
        """Serve each request on its own; one ``Answer`` per request, in order.

        Give either ``budget_ms`` (a per-request cap) or ``target_mean_latency_ms`` (the
        stream's mean latency; a request may take more or less: served at the latency price
        that meets the target on validation, ``price_for``).

        Args:
            images: one image per request (see :func:`load_image` for the accepted kinds).
            questions: one question (str) per request.
            budget_ms: one budget in milliseconds for all requests, or one per request;
                each finite and > 0.
            target_mean_latency_ms: a target mean latency in milliseconds (> 0).
        """
        if (budget_ms is None) == (target_mean_latency_ms is None):
            raise ValueError("give either budget_ms (a per-request cap) or target_mean_latency_ms (a stream's mean)")
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
        price = 0.0
        if target_mean_latency_ms is not None:
            price = self.price_for(target_mean_latency_ms)
            budgets = torch.full((len(questions),), math.inf, dtype=torch.float64)
        elif isinstance(budget_ms, (int, float)) and not isinstance(budget_ms, bool):
            budgets = check_budgets([float(budget_ms)] * len(questions))
        else:
            budgets = check_budgets(list(budget_ms) if not isinstance(budget_ms, torch.Tensor) else budget_ms)
            if len(budgets) != len(questions):
                raise ValueError(f"got {len(budgets)} budgets for {len(questions)} requests: give one, or one per request")
        pixels = [load_image(image) for image in images]
        return [
            self._serve(image, question, budget, price) for image, question, budget in zip(pixels, questions, budgets.tolist())
        ]

    def _serve(self, image: torch.Tensor, question: str, budget_ms: float, price: float = 0.0) -> Answer:
        unknown = self.vlm.unknown_words(question)
        text, knobs, total_ms, decision_ms = self.server.serve(image, question, budget_ms, price=price)
        return Answer(
            text=text,
            knobs=knobs,
            latency_ms=total_ms,
            budget_ms=float(budget_ms) if math.isfinite(budget_ms) else None,
            decision_ms=decision_ms,
            table_latency_ms=self.table.latency(knobs),
            unknown_words=unknown,
            price=price,
        )
