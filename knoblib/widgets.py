"""The budget explorer: pick a request, move the latency budget, watch the knobs.

``BudgetExplorer`` holds the shipped pieces (VLM, latency table, per-configuration
validation accuracy, the Mode-A and Mode-B controllers) and answers one question: *at
this budget, which knobs does the controller choose for this request, what does the
model answer with them, and does the configuration fit?* It also gives the static lookup
table's choice at the same budget, the baseline a controller must beat.

A request is served one of two ways (the two forms of the problem, notebook 00): with a
**per-request budget** in milliseconds, or in the **average-latency mode** with no budget
and a **latency price** lambda (a controller trained with ``--max-price`` reads it; the price
that meets a target mean latency is ``price_for_target``). At a price the static
comparison is the single configuration with the best validation accuracy minus
``lambda * latency / full latency`` (``static_choice``), the content-agnostic policy at
that price.

Every piece of logic the widgets run is a plain method or function here (``explain``,
``new_sample``, ``render``, ``figure``, ``price_for_target``, ``serving_condition``): an
exception inside an ipywidgets callback does not fail papermill, so the notebook calls
these once outside the widget and the tests call them directly. ``build_explorer_ui`` only
wires widgets to them; the drawing is in ``knoblib.plots``.

The UI marks its parts with stable CSS classes (``CSS_CLASSES``) and writes one-line
texts a browser test can parse::

    knobs: tier=high p=2 top_k=4 blocks=8
    answer: red (correct)
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .controller import CONTROLLER_MODES
from .data import VQASample, data_path, generate_split
from .evaluate import LookupTablePolicy, load_config_accuracy
from .features import LanguageFeatureExtractor
from .knobs import KnobConfig
from .latency import BudgetSampler, LatencyTable
from .plots import figure_png, plot_budget_choice, plot_budget_response

# A controller's mode -> how ``run_controller`` executes it (Mode A resumes its forward at
# p, so it costs one forward like Mode B).
MODES: dict[str, str] = {mode: {"A": "A-resumable"}.get(mode, mode) for mode in CONTROLLER_MODES}

# Stable CSS classes of the UI's parts (a browser test finds them by these).
CSS_CLASSES: dict[str, str] = {
    "root": "knoblib-explorer",
    "sample": "knoblib-sample",
    "new_sample": "knoblib-new-sample",
    "mode": "knoblib-mode",
    "budget": "knoblib-budget-slider",
    "serve_by": "knoblib-serve-by",
    "price": "knoblib-price-slider",
    "knobs": "knoblib-knobs",
    "answer": "knoblib-answer",
    "details": "knoblib-details",
    "figure": "knoblib-figure",
}

BUDGET_RULE = "must be a finite number of milliseconds > 0"
PRICE_RULE = "must be a finite number >= 0"
# How the UI serves the request: a per-request budget, or the average-latency mode at a price.
SERVE_BY = ("budget", "price")
_KNOBS_RE = re.compile(r"knobs:\s*tier=(\w+)\s+p=(\d+)\s+top_k=(\d+)\s+blocks=(\d+)")


def knobs_text(knobs: KnobConfig) -> str:
    """``tier=high p=2 top_k=4 blocks=8``: the knobs as one parseable line."""
    return f"tier={knobs.tier} p={knobs.insertion_position} top_k={knobs.top_k} blocks={knobs.num_active_blocks}"


def parse_knobs(text: str) -> KnobConfig:
    """The ``KnobConfig`` in the first ``knobs: tier=... p=... top_k=... blocks=...`` of ``text``."""
    match = _KNOBS_RE.search(text)
    if match is None:
        raise ValueError(f"no 'knobs: tier=... p=... top_k=... blocks=...' line in {text[:200]!r}")
    tier, p, k, n = match.groups()
    return KnobConfig(tier, int(p), int(k), int(n))


def _answer_text(answer: str, correct: bool, expected: str) -> str:
    shown = answer if answer else "<empty>"
    return f"{shown} (correct)" if correct else f"{shown} (wrong, expected {expected})"


@dataclass(frozen=True)
class ExplorerResult:
    """What the controller did for one request at one budget, and the lookup table beside it.

    Attributes:
        sample: the request (image + question + true answer).
        budget_ms: the latency budget.
        mode: ``A`` (latency token, resumable forward) or ``B`` (all knobs before the run).
        knobs: the four knobs the controller chose greedily.
        answer: the VLM's answer with those knobs; correct: exact match with the truth.
        latency_ms: the profiled batch-1 latency of ``knobs`` (the latency table).
        val_accuracy: that configuration's validation accuracy as a fixed configuration
            (None if it was not measured).
        table_knobs / table_answer / table_correct / table_latency_ms / table_val_accuracy:
            the same for the static comparison: the lookup table at the same budget, or at
            a price the best single configuration at that price (``static_choice``).
        price: the latency price lambda in the average-latency mode (``budget_ms`` is then
            ``inf``: no per-request budget), None for a per-request budget.
    """

    sample: VQASample
    budget_ms: float
    mode: str
    knobs: KnobConfig
    answer: str
    correct: bool
    latency_ms: float
    val_accuracy: float | None
    table_knobs: KnobConfig
    table_answer: str
    table_correct: bool
    table_latency_ms: float
    table_val_accuracy: float | None
    price: float | None = None

    @property
    def average_mode(self) -> bool:
        """True when the request was served at a latency price, without a per-request budget."""
        return self.price is not None

    @property
    def latency_over_budget(self) -> float:
        """latency / budget (0 in the average-latency mode: no budget)."""
        return self.latency_ms / self.budget_ms if math.isfinite(self.budget_ms) else 0.0

    @property
    def violated(self) -> bool:
        """True when the chosen configuration's latency exceeds the budget."""
        return self.latency_ms > self.budget_ms

    @property
    def table_violated(self) -> bool:
        return self.table_latency_ms > self.budget_ms

    def knobs_line(self) -> str:
        return f"knobs: {knobs_text(self.knobs)}"

    def answer_line(self) -> str:
        return f"answer: {_answer_text(self.answer, self.correct, self.sample.answer)}"

    def as_dict(self) -> dict:
        """A flat dict of str / float / int / bool values (for JSON)."""
        return {
            "uid": self.sample.uid,
            "family": self.sample.family,
            "question": self.sample.question,
            "true_answer": self.sample.answer,
            "budget_ms": float(self.budget_ms) if math.isfinite(self.budget_ms) else None,
            "price": self.price,
            "mode": self.mode,
            "knobs": self.knobs.short(),
            "answer": self.answer,
            "correct": bool(self.correct),
            "latency_ms": float(self.latency_ms),
            "latency_over_budget": float(self.latency_over_budget),
            "violated": bool(self.violated),
            "val_accuracy": self.val_accuracy,
            "table_knobs": self.table_knobs.short(),
            "table_answer": self.table_answer,
            "table_correct": bool(self.table_correct),
            "table_latency_ms": float(self.table_latency_ms),
            "table_violated": bool(self.table_violated),
            "table_val_accuracy": self.table_val_accuracy,
        }


def _sample_key(sample: VQASample) -> tuple:
    # uids repeat across generator seeds' first samples, so the content is part of the key.
    return (sample.uid, sample.question, sample.answer, json.dumps(sample.scene, sort_keys=True))


class BudgetExplorer:
    """Explain the controller's choice for one request at one budget.

    Args:
        vlm: the ``KnobVLM`` that answers.
        controllers: ``{"A": Mode-A controller, "B": Mode-B controller}`` (either may be
            left out); each controller's ``config.mode`` must equal its key.
        table: the profiled latency of every configuration (``LatencyTable``).
        config_accuracy: configuration -> {"all": validation accuracy, ...}, the lookup
            table's ranking (``load_config_accuracy``).
        samples: the requests to pick from by index (``new_sample`` adds more).
        answer_tokens: most tokens decoded per answer (answers are one word + eos).
        margin: the budget range is the table's achievable range widened by this
            fraction at both ends (``BudgetSampler``), as in training.
    """

    def __init__(
        self,
        vlm,
        controllers: Mapping[str, object],
        table: LatencyTable,
        config_accuracy: Mapping[KnobConfig, Mapping[str, float]],
        samples: Sequence[VQASample],
        answer_tokens: int = 3,
        margin: float = 0.1,
    ) -> None:
        if not controllers:
            raise ValueError(f"controllers is empty: give at least one of {list(MODES)}")
        for name, controller in controllers.items():
            if name not in MODES:
                raise ValueError(f"controllers has key {name!r}: allowed {list(MODES)}")
            if controller.config.mode != name:
                raise ValueError(f"controllers[{name!r}] is a Mode-{controller.config.mode} controller")
            if controller.knob_space != vlm.knob_space:
                raise ValueError(
                    f"controllers[{name!r}] has knob space {controller.knob_space}, the VLM {vlm.knob_space}"
                )
        table.check_space(vlm.knob_space)
        if not config_accuracy:
            raise ValueError("config_accuracy is empty: the lookup table needs per-configuration accuracies")
        samples = list(samples)
        if not samples:
            raise ValueError("samples is empty: give at least one request")
        if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
            raise ValueError(f"answer_tokens={answer_tokens!r} is invalid: must be an integer >= 1")
        self.vlm = vlm.eval()
        self.controllers = {m: controllers[m].eval() for m in MODES if m in controllers}
        self.table = table
        # Each controller is served as it was trained: with the budget guard or without.
        from .guard import BudgetGuard

        self.guards = {
            name: BudgetGuard(table, vlm.knob_space) if getattr(c.config, "budget_guard", False) else None
            for name, c in controllers.items()
        }
        self.config_accuracy = dict(config_accuracy)
        self.samples = samples
        self.answer_tokens = answer_tokens
        self.sampler = BudgetSampler(table, margin=margin)
        self.lookup = LookupTablePolicy(table, self.config_accuracy)
        self.language = LanguageFeatureExtractor.from_vlm(vlm)
        self._cache: dict[tuple, ExplorerResult] = {}

    @classmethod
    def from_shipped(cls, num_samples: int = 8, split: str = "val", **kwargs) -> "BudgetExplorer":
        """The explorer over the shipped assets in ``data/``: the VLM, latency table,
        validation accuracies, both controllers and the first ``num_samples`` of ``split``."""
        from .assets import load_assets, load_samples
        from .controller import TwoStageController

        vlm, table = load_assets()
        controllers = {
            mode: TwoStageController.load(
                data_path(f"controller_{mode}"), expected_space=vlm.knob_space, expected_mode=mode
            )
            for mode in MODES
        }
        accuracy = load_config_accuracy(data_path("config_accuracy_val.json"))
        samples = load_samples(split, num_samples)
        return cls(vlm, controllers, table, accuracy, samples, **kwargs)

    # --- inputs -----------------------------------------------------------------------
    @property
    def modes(self) -> tuple[str, ...]:
        """The modes with a controller, e.g. ``("A", "B")``."""
        return tuple(self.controllers)

    @property
    def budget_range(self) -> tuple[float, float]:
        """(low, high) in ms: from a little below the fastest configuration to a little above the slowest,
        as in training, and within the range every controller was trained on (a budget outside it
        would only be served like the range's edge)."""
        low, high = self.sampler.low, self.sampler.high
        for controller in self.controllers.values():
            lo, hi = controller.config.budget_range
            low, high = max(low, self.table.absolute(lo)), min(high, self.table.absolute(hi))
        return (low, high) if low < high else (self.sampler.low, self.sampler.high)

    def sample(self, which: int | VQASample) -> VQASample:
        """The request at index ``which`` of ``samples``, or ``which`` itself if it is a ``VQASample``."""
        if isinstance(which, VQASample):
            return which
        if isinstance(which, bool) or not isinstance(which, numbers.Integral):
            raise TypeError(f"sample must be an index or a VQASample, got {type(which).__name__}")
        which = int(which)
        if not 0 <= which < len(self.samples):
            raise ValueError(f"sample={which} is out of range: allowed 0..{len(self.samples) - 1}")
        return self.samples[which]

    @staticmethod
    def check_budget(budget_ms: float) -> float:
        """``budget_ms`` as a float; ValueError unless it is a finite number > 0."""
        try:
            if isinstance(budget_ms, (bool, str, bytes)):
                raise TypeError
            value = float(budget_ms)
        except (TypeError, ValueError):
            raise ValueError(f"budget_ms={budget_ms!r} is invalid: {BUDGET_RULE}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget_ms={budget_ms!r} is invalid: {BUDGET_RULE}")
        return value

    def check_mode(self, mode: str) -> str:
        if mode not in self.controllers:
            raise ValueError(f"mode={mode!r} is invalid: allowed {list(self.controllers)}")
        return mode

    def max_price(self, mode: str = "B") -> float:
        """The largest latency price the mode's controller was trained on (0: it has no price input)."""
        return float(self.controllers[self.check_mode(mode)].config.max_price)

    def check_price(self, price: float, mode: str = "B") -> float:
        """``price`` as a float; ValueError unless it is a finite number >= 0 and the mode's
        controller reads a price (``max_price > 0``)."""
        try:
            if isinstance(price, (bool, str, bytes)):
                raise TypeError
            value = float(price)
        except (TypeError, ValueError):
            raise ValueError(f"price={price!r} is invalid: {PRICE_RULE}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"price={price!r} is invalid: {PRICE_RULE}")
        if self.max_price(mode) <= 0:
            raise ValueError(
                f"the Mode-{mode} controller has no latency-price input (max_price=0): it serves per-request "
                "budgets only; train one with `python -m knoblib train --max-price 8 --average-fraction 0.5`"
            )
        return value

    def static_choice(self, price: float) -> KnobConfig:
        """The content-agnostic choice at a latency price: the configuration with the best validation
        accuracy minus ``price * latency / full latency`` (the faster one on a tie)."""
        reference = self.table.reference_ms
        return max(
            self.config_accuracy,
            key=lambda k: (float(self.config_accuracy[k]["all"]) - price * self.table.latency(k) / reference, -self.table.latency(k)),
        )

    # --- the callbacks ----------------------------------------------------------------
    def explain(
        self, which: int | VQASample, budget_ms: float | None, mode: str = "B", price: float | None = None
    ) -> ExplorerResult:
        """The controller's greedy knobs for one request, its answer, the profiled latency, and the
        static choice beside it.

        Give a per-request ``budget_ms`` (the lookup table's choice at the same budget is the
        comparison), or ``price`` with ``budget_ms=None``: the average-latency mode, no
        budget, the latency price lambda (compared with :meth:`static_choice`).
        """
        mode = self.check_mode(mode)
        if price is not None:
            if budget_ms is not None:
                raise ValueError("give either budget_ms (a per-request budget) or price (the average-latency mode), not both")
            return self._run([self.sample(which)], [math.inf], mode, [self.check_price(price, mode)])[0]
        return self._run([self.sample(which)], [self.check_budget(budget_ms)], mode)[0]

    def mean_latency_at_price(self, price: float, mode: str = "B", samples: Sequence[VQASample] | None = None) -> float:
        """The mode's controller's mean latency (table medians) over ``samples`` (default: the
        explorer's requests) at ``price``, in the average-latency mode."""
        from .plane import controller_choices

        price = self.check_price(price, mode)
        samples = list(self.samples if samples is None else samples)
        inf = torch.full((len(samples),), math.inf, dtype=torch.float64)
        prices = torch.full((len(samples),), price, dtype=torch.float64)
        knobs = controller_choices(self.vlm, self.controllers[mode], samples, self.table, inf, prices, self.guard_quantile(mode))
        return float(self.table.latencies(knobs).mean())

    def price_for_target(
        self, target_ms: float, mode: str = "B", samples: Sequence[VQASample] | None = None, iterations: int = 12
    ) -> float:
        """The latency price at which the controller's mean latency over ``samples`` (default: the
        explorer's requests) meets ``target_ms`` (bisection, ``knoblib.plane.find_price``)."""
        from .plane import find_price

        target = self.check_budget(target_ms)
        max_price = self.max_price(self.check_mode(mode))
        self.check_price(0.0, mode)  # refuses a controller without a price input
        return find_price(lambda p: self.mean_latency_at_price(p, mode, samples), target, max_price, iterations=iterations)

    def guard_quantile(self, mode: str) -> float | None:
        guard = self.guards.get(mode)
        return None if guard is None else guard.quantile

    def explain_many(self, which: Sequence[int | VQASample], budget_ms: float, mode: str = "B") -> list[ExplorerResult]:
        """``explain`` for several requests at one budget, as one batch."""
        samples = [self.sample(w) for w in which]
        if not samples:
            raise ValueError("which is empty: give at least one request")
        budget = self.check_budget(budget_ms)
        return self._run(samples, [budget] * len(samples), self.check_mode(mode))

    def budget_response(
        self, which: int | VQASample, budgets_ms: Sequence[float] | None = None, mode: str = "B"
    ) -> list[ExplorerResult]:
        """``explain`` for one request at several budgets (default: 9 evenly spaced over
        ``budget_range``), as one batch."""
        sample = self.sample(which)
        if budgets_ms is None:
            low, high = self.budget_range
            budgets_ms = torch.linspace(low, high, 9, dtype=torch.float64).tolist()
        budgets = [self.check_budget(b) for b in budgets_ms]
        if not budgets:
            raise ValueError("budgets_ms is empty: give at least one budget")
        return self._run([sample] * len(budgets), budgets, self.check_mode(mode))

    def price_response(self, which: int | VQASample, prices: Sequence[float], mode: str = "B") -> list[ExplorerResult]:
        """``explain`` for one request at several latency prices (average-latency mode), as one batch."""
        sample = self.sample(which)
        mode = self.check_mode(mode)
        checked = [self.check_price(p, mode) for p in prices]
        if not checked:
            raise ValueError("prices is empty: give at least one price")
        return self._run([sample] * len(checked), [math.inf] * len(checked), mode, checked)

    def knobs_change(self, which: int | VQASample, mode: str = "B") -> bool:
        """Whether the chosen knobs differ between the lowest and the highest budget."""
        low, high = self.budget_response(which, list(self.budget_range), mode)
        return low.knobs != high.knobs

    def new_sample(self, seed: int) -> VQASample:
        """A fresh request, ``generate_split(1, seed)``, appended to ``samples`` (index ``len(samples) - 1``)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: must be an integer >= 0")
        sample = generate_split(1, seed)[0]
        self.samples.append(sample)
        return sample

    @torch.no_grad()
    def _run(
        self, samples: list[VQASample], budgets: list[float], mode: str, prices: list[float] | None = None
    ) -> list[ExplorerResult]:
        from .grpo import run_controller

        prices = [None] * len(samples) if prices is None else list(prices)
        keys = [(_sample_key(s), b, mode, p) for s, b, p in zip(samples, budgets, prices)]
        first_row: dict[tuple, int] = {}
        for i, key in enumerate(keys):
            if key not in self._cache:
                first_row.setdefault(key, i)
        pending = list(first_row.values())
        if pending:
            rows = [samples[i] for i in pending]
            row_budgets = [budgets[i] for i in pending]
            row_prices = [prices[i] for i in pending]
            images = [s.image() for s in rows]
            questions = [s.question for s in rows]
            priced = self.max_price(mode) > 0
            run = run_controller(
                self.vlm, self.controllers[mode], self.language, images, questions,
                torch.tensor(row_budgets, dtype=torch.float64), self.table, MODES[mode], self.answer_tokens, greedy=True,
                guard=self.guards[mode],
                prices=torch.tensor([p or 0.0 for p in row_prices], dtype=torch.float64) if priced else None,
            )
            table_knobs = [self.lookup.choose_one(b) if p is None else self.static_choice(p) for b, p in zip(row_budgets, row_prices)]
            table_answers = self.vlm.generate(images, questions, table_knobs, self.answer_tokens).answers
            outcomes = zip(pending, rows, row_budgets, run.knobs, run.answers, table_knobs, table_answers, row_prices)
            for i, s, b, knobs, answer, tk, ta, price in outcomes:
                self._cache[keys[i]] = ExplorerResult(
                    sample=s,
                    budget_ms=b,
                    mode=mode,
                    knobs=knobs,
                    answer=answer,
                    correct=answer == s.answer,
                    latency_ms=self.table.latency(knobs),
                    val_accuracy=self._accuracy(knobs),
                    table_knobs=tk,
                    table_answer=ta,
                    table_correct=ta == s.answer,
                    table_latency_ms=self.table.latency(tk),
                    table_val_accuracy=self._accuracy(tk),
                    price=price,
                )
        return [self._cache[key] for key in keys]

    def _accuracy(self, knobs: KnobConfig) -> float | None:
        row = self.config_accuracy.get(knobs)
        return None if row is None else float(row["all"])

    # --- showing a result -------------------------------------------------------------
    @staticmethod
    def render(result: ExplorerResult) -> str:
        """A plain-text summary, one fact per line (``knobs:``, ``answer:``, ``latency:`` ...)."""

        def fit(latency: float) -> str:
            if result.average_mode:
                return f"{latency:.1f} ms (no per-request budget)"
            status = "VIOLATED" if latency > result.budget_ms else "within budget"
            return f"{latency:.1f} ms = {latency / result.budget_ms:.2f} x budget ({status})"

        def val(acc: float | None) -> str:
            return "not measured" if acc is None else f"{100 * acc:.1f}%"

        s = result.sample
        if result.average_mode:
            condition = f"budget: none, average-latency mode at latency price {result.price:.2f} (mode {result.mode})"
            static = "static choice at this price"
        else:
            condition = f"budget: {result.budget_ms:.1f} ms (mode {result.mode})"
            static = "lookup table"
        return "\n".join(
            [
                f"request: {s.uid} [{s.family}] {s.question}",
                condition,
                result.knobs_line(),
                result.answer_line(),
                f"latency: {fit(result.latency_ms)}",
                f"val accuracy of these knobs as a fixed configuration: {val(result.val_accuracy)}",
                f"{static}: {knobs_text(result.table_knobs)} | answer: "
                f"{_answer_text(result.table_answer, result.table_correct, s.answer)} | "
                f"latency: {fit(result.table_latency_ms)} | val accuracy {val(result.table_val_accuracy)}",
            ]
        )

    def figure(self, result: ExplorerResult):
        """The request's image with question and answer, beside the Pareto plot of every fixed
        configuration (accuracy vs latency) with the chosen and the lookup table's
        configurations circled and the budget drawn as a vertical line (``plots.plot_budget_choice``).

        Returns a closed ``matplotlib.figure.Figure`` (not shown automatically): show it as
        a cell's last expression or ``display(fig)``; save it with ``fig.savefig``.
        """
        static = "static" if result.average_mode else "lookup"
        if result.knobs == result.table_knobs:
            choices = {f"Mode {result.mode} = {static}: {result.knobs.short()}": result.knobs}
        else:
            choices = {
                f"Mode {result.mode}: {result.knobs.short()}": result.knobs,
                f"{static}: {result.table_knobs.short()}": result.table_knobs,
            }
        s = result.sample
        fig = plot_budget_choice(
            self.config_accuracy, self.table, result.budget_ms, choices,
            s.image(), s.question, result.answer, s.answer, result.latency_ms, price=result.price,
        )
        return _closed(fig)

    def response_figure(self, which: int | VQASample, budgets_ms: Sequence[float] | None = None):
        """The profiled latency each mode's controller and the lookup table choose for one
        request, against the budget (default: ``budget_response``'s 9 budgets;
        ``plots.plot_budget_response``). Points above the diagonal violate the budget;
        filled markers answered correctly.

        Returns a closed ``matplotlib.figure.Figure`` (see ``figure``).
        """
        sample = self.sample(which)
        runs = {f"Mode {m}": self.budget_response(sample, budgets_ms, m) for m in self.modes}
        first = next(iter(runs.values()))
        policies = {name: [(r.latency_ms, r.correct, r.knobs) for r in results] for name, results in runs.items()}
        policies["lookup table"] = [(r.table_latency_ms, r.table_correct, r.table_knobs) for r in first]
        fig = plot_budget_response([r.budget_ms for r in first], policies, f"request {sample.uid} [{sample.family}]")
        return _closed(fig)


def _closed(fig):
    """``fig``, closed in pyplot: the caller decides where it is shown (the widget renders it to PNG)."""
    plt.close(fig)
    return fig


def format_results(results: Sequence[ExplorerResult]) -> str:
    """A plain-text table, one line per result: budget, knobs, latency, fit, answer, and the lookup table's."""
    head = (
        f"{'budget ms':>9} {'mode':>4} | {'knobs':>14} {'latency':>8} {'fit':>8} {'answer':>12} | "
        f"{'lookup':>14} {'latency':>8} {'answer':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        mark = "" if r.correct else " x"
        table_mark = "" if r.table_correct else " x"
        where = f"{r.budget_ms:>9.1f}" if not r.average_mode else f"{'λ=' + format(r.price, '.2f'):>9}"
        lines.append(
            f"{where} {r.mode:>4} | {r.knobs.short():>14} {r.latency_ms:>8.1f} "
            f"{'VIOLATED' if r.violated else ('fits' if not r.average_mode else '-'):>8} {(r.answer or '<empty>') + mark:>12} | "
            f"{r.table_knobs.short():>14} {r.table_latency_ms:>8.1f} {(r.table_answer or '<empty>') + table_mark:>12}"
        )
    lines.append("(x = wrong answer)")
    return "\n".join(lines)


# --- the widget -------------------------------------------------------------------------
def find_widget(root, css_class: str):
    """The first widget under ``root`` (depth first, ``root`` included) carrying ``css_class``."""
    if css_class in getattr(root, "_dom_classes", ()):
        return root
    for child in getattr(root, "children", ()):
        found = find_widget(child, css_class)
        if found is not None:
            return found
    return None


def serving_condition(serve_by: str, budget_ms: float, price: float) -> dict:
    """The keyword arguments of ``BudgetExplorer.explain`` for the UI's "serve by" choice:
    ``{"budget_ms": budget_ms, "price": None}`` for a per-request budget, ``{"budget_ms": None,
    "price": price}`` for the average-latency mode at a latency price."""
    if serve_by == "budget":
        return {"budget_ms": budget_ms, "price": None}
    if serve_by == "price":
        return {"budget_ms": None, "price": price}
    raise ValueError(f"serve_by={serve_by!r} is invalid: allowed {list(SERVE_BY)}")


def build_explorer_ui(
    explorer: BudgetExplorer,
    sample: int = 0,
    budget_ms: float | None = None,
    mode: str = "B",
    first_seed: int = 1000,
    serve_by: str = "budget",
    price: float = 0.0,
):
    """An ipywidgets UI over ``explorer``: request picker, "new sample" button, Stage-2 mode
    toggle, how the request is served (a per-request budget, or the average-latency mode at a
    latency price), the budget slider (over ``explorer.budget_range``) and the price slider
    (over [0, the controllers' largest ``max_price``]), and the knobs, answer, details and
    figure of the current choice.

    Args:
        explorer: the ``BudgetExplorer``.
        sample: the index of the request shown first.
        budget_ms: the first budget (default: the middle of the range).
        mode: the first mode (``A`` or ``B``).
        first_seed: the "new sample" button draws ``generate_split(1, seed)`` with
            seeds from here on.
        serve_by: ``budget`` or ``price`` (``SERVE_BY``), what the UI starts with.
        price: the first latency price.

    Returns an ``ipywidgets.VBox``; find its parts with ``find_widget(ui, CSS_CLASSES[...])``.
    Errors in a callback are shown in the details area (they would otherwise vanish); so is a
    price asked of a controller without a price input.
    """
    import ipywidgets as w

    explorer.sample(sample)
    low, high = explorer.budget_range
    budget_ms = (low + high) / 2 if budget_ms is None else explorer.check_budget(budget_ms)
    explorer.check_mode(mode)
    serving_condition(serve_by, budget_ms, price)
    top_price = max((explorer.max_price(m) for m in explorer.modes), default=0.0)
    if serve_by == "price":
        explorer.check_price(price, mode)

    def sample_options():
        return [(f"{i}: [{s.family}] {s.question}", i) for i, s in enumerate(explorer.samples)]

    picker = w.Dropdown(options=sample_options(), value=sample, description="request", layout=w.Layout(width="520px"))
    new_button = w.Button(description="new sample", icon="refresh", tooltip="draw a fresh request")
    mode_toggle = w.ToggleButtons(
        options=[(f"Mode {m}", m) for m in explorer.modes], value=mode, style={"button_width": "90px"},
        tooltips=[f"Stage 2 input: {'latency token' if m == 'A' else 'language + budget'}" for m in explorer.modes],
    )
    slider = w.FloatSlider(
        value=min(max(budget_ms, low), high), min=low, max=high, step=(high - low) / 200,
        description="budget (ms)", continuous_update=False, readout_format=".1f",
        layout=w.Layout(width="640px"), style={"description_width": "initial"},
    )
    serve_toggle = w.ToggleButtons(
        options=[("per-request budget", "budget"), ("latency price", "price")], value=serve_by,
        style={"button_width": "150px"},
        tooltips=["every request must fit the budget", "no budget: the stream's mean latency is steered by the price"],
    )
    price_slider = w.FloatSlider(
        value=min(max(float(price), 0.0), top_price or 1.0), min=0.0, max=top_price or 1.0, step=(top_price or 1.0) / 100,
        description="latency price λ", continuous_update=False, readout_format=".2f", disabled=top_price <= 0,
        layout=w.Layout(width="640px"), style={"description_width": "initial"},
    )
    knobs_label, answer_label, details = w.HTML(), w.HTML(), w.HTML()
    figure_out = w.Output()
    for widget, role in [
        (picker, "sample"), (new_button, "new_sample"), (mode_toggle, "mode"), (slider, "budget"),
        (serve_toggle, "serve_by"), (price_slider, "price"),
        (knobs_label, "knobs"), (answer_label, "answer"), (details, "details"), (figure_out, "figure"),
    ]:
        widget.add_class(CSS_CLASSES[role])
    state = {"seed": first_seed, "hold": False}

    def refresh(_change=None) -> None:
        if state["hold"]:
            return
        try:
            result = explorer.explain(
                picker.value, mode=mode_toggle.value, **serving_condition(serve_toggle.value, slider.value, price_slider.value)
            )
            lines = explorer.render(result).splitlines()
            png = base64.b64encode(figure_png(explorer.figure(result))).decode("ascii")
            color = "#1a7f37" if result.correct else "#b2182b"
            rest = [line for line in lines if not line.startswith(("knobs:", "answer:"))]
            # Figure first, details last: once the details show the new budget, everything does.
            figure_out.outputs = (
                {
                    "output_type": "display_data",
                    "data": {"image/png": png, "text/plain": "<budget explorer figure>"},
                    "metadata": {},
                },
            )
            knobs_label.value = f'<span style="font-size:1.2em"><b>{html.escape(result.knobs_line())}</b></span>'
            answer_label.value = (
                f'<span style="font-size:1.2em;color:{color}">{html.escape(result.answer_line())}</span>'
            )
            details.value = "<pre style='margin:0'>" + html.escape("\n".join(rest)) + "</pre>"
        except Exception as err:  # shown, not swallowed: widget callbacks fail silently otherwise
            knobs_label.value = "knobs: (error)"
            answer_label.value = "answer: (error)"
            details.value = f"<pre style='color:#b2182b'>error: {html.escape(f'{type(err).__name__}: {err}')}</pre>"

    def add_sample(_button=None) -> None:
        try:
            explorer.new_sample(state["seed"])
        except Exception as err:
            details.value = f"<pre style='color:#b2182b'>error: {html.escape(f'{type(err).__name__}: {err}')}</pre>"
            return
        state["seed"] += 1
        state["hold"] = True  # replacing the options fires value changes: refresh once at the end
        try:
            picker.options = sample_options()
            picker.value = len(explorer.samples) - 1
        finally:
            state["hold"] = False
        refresh()

    picker.observe(refresh, names="value")
    mode_toggle.observe(refresh, names="value")
    slider.observe(refresh, names="value")
    serve_toggle.observe(refresh, names="value")
    price_slider.observe(refresh, names="value")
    new_button.on_click(add_sample)
    refresh()
    ui = w.VBox(
        [
            w.HBox([picker, new_button]),
            w.HBox([w.Label("Stage 2 input", layout=w.Layout(width="110px")), mode_toggle]),
            w.HBox([w.Label("serve with", layout=w.Layout(width="110px")), serve_toggle]),
            slider,
            price_slider,
            knobs_label,
            answer_label,
            details,
            figure_out,
        ]
    )
    ui.add_class(CSS_CLASSES["root"])
    return ui
