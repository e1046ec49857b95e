"""Evaluation: per-configuration accuracy, the knob table, the policies, and the measured sweep.

A *policy* maps (requests, budgets) to one ``KnobConfig`` per request and answers them:

* the trained controller (Mode A, resumable, and Mode B, and the variants), acting greedily;
* the static lookup table: the configuration with the best validation accuracy whose
  profiled latency fits the budget (content-agnostic: the baseline to beat);
* a random feasible policy: uniform over the configurations that fit;
* the full model, whatever the budget.

``knoblib.plane`` scores their choices on the accuracy / mean-latency plane from per-sample
correctness; ``measured_sweep`` here serves them one request at a time and times each by
the wall clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import FAMILIES, VQASample
from .guard import DEFAULT_QUANTILE
from .knobs import KnobConfig, KnobSpace
from .latency import LatencyTable, check_budgets
from .vlm import KnobVLM


# --- accuracy of fixed configurations --------------------------------------------
@torch.no_grad()
def config_accuracy(
    vlm: KnobVLM,
    samples: list[VQASample],
    configs: list[KnobConfig],
    batch_size: int = 100,
    images: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[KnobConfig, dict[str, float]]:
    """Greedy exact-match accuracy of each configuration, overall (``all``) and per family."""
    from tqdm.auto import tqdm

    from .accuracy import correct_answers, family_accuracy

    images = [s.image() for s in samples] if images is None else images
    return {
        knobs: family_accuracy(samples, correct_answers(vlm, samples, knobs, images=images, batch_size=batch_size))
        for knobs in tqdm(configs, desc="configurations", disable=not progress)
    }


def knob_table_configs(space: KnobSpace) -> list[tuple[str, KnobConfig]]:
    """The full configuration, each knob moved alone (to each of its cheaper values), and the cheapest.

    p only says where Stage 2 decides: it changes no work by itself, so the moves use
    p = 1, where top-k reaches every block after block 0 and the most blocks may drop.
    """
    full = KnobConfig(space.tiers[-1], 1, space.default_top_k, space.num_layers)
    rows = [("full", full)]
    rows += [(f"tier={t}", KnobConfig(t, 1, full.top_k, full.num_active_blocks)) for t in reversed(space.tiers[:-1])]
    rows += [(f"top_k={k}", KnobConfig(full.tier, 1, k, full.num_active_blocks)) for k in reversed(space.top_k_options[:-1])]
    rows += [
        (f"blocks={n}", KnobConfig(full.tier, 1, full.top_k, n)) for n in reversed(space.block_options(1)[:-1])
    ]
    rows.append(("cheapest", space.cheapest()))
    return rows


def save_config_accuracy(result: dict[KnobConfig, dict[str, float]], path: str | Path, split: str) -> None:
    rows = [{**k.as_dict(), **v} for k, v in result.items()]
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"split": split, "rows": rows}, indent=1))
    tmp.replace(path)


def load_config_accuracy(path: str | Path) -> dict[KnobConfig, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m knoblib config-accuracy`")
    try:
        rows = json.loads(path.read_text())["rows"]
        out = {}
        for row in rows:
            knobs = KnobConfig(row["tier"], row["insertion_position"], row["top_k"], row["num_active_blocks"])
            out[knobs] = {k: v for k, v in row.items() if k not in knobs.as_dict()}
        return out
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from err


# --- policies ---------------------------------------------------------------------
# A policy picks one configuration per request. Every policy offers the same three calls:
#   choose(vlm, samples, images, budgets)  -> (knobs, answers)   batched, for table-based sweeps
#   serve_one(vlm, image, question, budget_ms, answer_tokens) -> (answer, knobs)   one request
# and reads latencies at the same ``quantile`` as the budget guard, so a baseline and the
# controller are served the same way (``knoblib.serving.Server`` adds what serving by the
# wall clock needs on top: the decision's own time, the machine's drift, the full
# configuration above its latency).
class StaticPolicy(ABC):
    """A policy that picks from the budget (and the request) alone, before the model runs."""

    name = "static"

    @abstractmethod
    def choose_one(self, budget_ms: float, sample=None) -> KnobConfig:
        """The configuration for one request at ``budget_ms``."""

    def choose(self, vlm, samples, images, budgets) -> tuple[list[KnobConfig], list[str]]:
        budgets = check_budgets(budgets)
        knobs = [self.choose_one(b, s) for b, s in zip(budgets.tolist(), samples)]
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers

    def serve_one(
        self, vlm, image, question: str, budget_ms: float, answer_tokens: int, price: float = 0.0
    ) -> tuple[str, KnobConfig]:
        knobs = self.choose_one(budget_ms)
        return vlm.generate([image], [question], knobs, answer_tokens).answers[0], knobs


class LookupTablePolicy(StaticPolicy):
    """The best-validation-accuracy configuration whose latency fits the budget (fastest if none fits).

    Args:
        table: this machine's latency table.
        val_accuracy: per-configuration accuracy on validation (``load_config_accuracy``).
        quantile: the latency quantile that must fit (the budget guard's).
    """

    name = "lookup table"

    def __init__(self, table: LatencyTable, val_accuracy: dict[KnobConfig, dict[str, float]], quantile: float = DEFAULT_QUANTILE):
        self.table = table
        table.factor(quantile)  # a quantile the table keeps, else a ValueError naming them
        self.quantile = float(quantile)
        # Ties go to the faster configuration.
        self.ranked = sorted(val_accuracy, key=lambda k: (-val_accuracy[k]["all"], table.latency(k)))

    def choose_one(self, budget: float, sample=None) -> KnobConfig:
        budget = float(check_budgets([budget])[0])
        for knobs in self.ranked:
            if self.table.latency(knobs, self.quantile) <= budget:
                return knobs
        return self.table.fastest()


class FamilyTablePolicy(StaticPolicy):
    """A lookup table per question family: the configuration most accurate *for the
    request's family* on validation whose latency fits the budget (fastest if none fits).

    Ties go to the overall table's order (more accurate over every family, then faster),
    so it departs from ``LookupTablePolicy`` only where validation shows a strict gain
    for that family. It reads each request's family, a label of the synthetic data that
    a served controller never sees (it sees the question), so it is an analysis bound
    (``family_oracle_gap``), not a baseline.
    """

    name = "family table"

    def __init__(
        self,
        table: LatencyTable,
        val_accuracy: dict[KnobConfig, dict[str, float]],
        quantile: float = DEFAULT_QUANTILE,
        ties: str = "table",
    ):
        if ties not in ("table", "faster"):
            raise ValueError(f"ties={ties!r} is invalid: allowed 'table' (the lookup table's order) or 'faster'")
        self.table = table
        table.factor(quantile)  # a quantile the table keeps, else a ValueError naming them
        self.quantile = float(quantile)
        # ties="faster": among configurations equally accurate for the family, the fastest
        # (the bound on what saved latency is worth); "table": the lookup table's choice.
        second = (lambda k: table.latency(k)) if ties == "faster" else (lambda k: -val_accuracy[k]["all"])
        self.ranked = {
            f: sorted(val_accuracy, key=lambda k, f=f: (-val_accuracy[k][f], second(k), table.latency(k)))
            for f in FAMILIES
        }

    def choose_one(self, family: str, budget: float) -> KnobConfig:
        if family not in self.ranked:
            raise ValueError(f"family={family!r} is invalid: allowed {list(self.ranked)}")
        budget = float(check_budgets([budget])[0])
        for knobs in self.ranked[family]:
            if self.table.latency(knobs, self.quantile) <= budget:
                return knobs
        return self.table.fastest()

    def choose(self, vlm, samples, images, budgets) -> tuple[list[KnobConfig], list[str]]:
        budgets = check_budgets(budgets)
        knobs = [self.choose_one(s.family, b) for b, s in zip(budgets.tolist(), samples)]
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers

    def serve_one(self, vlm, image, question, budget_ms, answer_tokens, price: float = 0.0):
        raise ValueError("the family table reads the data's family label, which a served request does not have")


class RandomFeasiblePolicy(StaticPolicy):
    """Uniform over the configurations whose latency fits the budget (fastest if none fits)."""

    name = "random feasible"

    def __init__(self, table: LatencyTable, seed: int = 0, quantile: float = DEFAULT_QUANTILE):
        self.table = table
        table.factor(quantile)  # a quantile the table keeps, else a ValueError naming them
        self.quantile = float(quantile)
        self.rng = random.Random(seed)

    def choose_one(self, budget: float, sample=None) -> KnobConfig:
        budget = float(check_budgets([budget])[0])
        feasible = self.table.feasible(budget, self.quantile)
        return self.rng.choice(feasible) if feasible else self.table.fastest()


class FullModelPolicy(StaticPolicy):
    """Always the full configuration."""

    name = "full model"

    def __init__(self, space: KnobSpace | None = None):
        self.space = space

    def choose_one(self, budget: float, sample=None) -> KnobConfig:
        check_budgets([budget])
        return (self.space or KnobSpace.for_model(8, 4)).full()

    def choose(self, vlm, samples, images, budgets):
        self.space = vlm.knob_space
        return super().choose(vlm, samples, images, budgets)

    def serve_one(self, vlm, image, question, budget_ms, answer_tokens, price: float = 0.0):
        self.space = vlm.knob_space
        return super().serve_one(vlm, image, question, budget_ms, answer_tokens, price)


class ControllerPolicy:
    """A trained ``TwoStageController`` acting greedily (Mode B, or Mode A with a resumable forward).

    Served as trained: with the budget guard (at ``quantile``) when the controller was
    trained with it. Budgets reach it relative to ``table``'s full-configuration latency.
    """

    def __init__(
        self, controller, vlm: KnobVLM, name: str | None = None, table: LatencyTable | None = None,
        quantile: float = DEFAULT_QUANTILE,
    ):
        from .features import LanguageFeatureExtractor
        from .guard import BudgetGuard

        if table is None:
            raise ValueError("a controller needs this machine's latency table (budgets reach it relative to it)")
        self.controller = controller.eval()
        self.table = table
        self.guard = BudgetGuard(table, vlm.knob_space, quantile) if controller.config.budget_guard else None
        self.mode = "B" if controller.config.mode == "B" else "A-resumable"
        self.language = LanguageFeatureExtractor(vlm.input_embeddings, vlm.tokenizer)
        from .variants import controller_name

        # "controller (Mode A)", "controller (Mode B + vision)", "controller (hybrid as A)", ...
        self.name = name or controller_name(controller)
        # The vision-aware Mode B runs the vision tower between its two stages.
        self.vlm = vlm
        self._decider = None

    def choose(self, vlm, samples, images, budgets):
        from .grpo import run_controller

        # A served request's budget is a number of milliseconds (the average-latency mode,
        # inf with a price, goes through knoblib.plane and knoblib.serving).
        budgets = check_budgets(budgets)
        run = run_controller(
            vlm, self.controller, self.language, images, [s.question for s in samples], budgets, self.table,
            self.mode, 3, greedy=True, guard=self.guard,
        )
        return run.knobs, run.answers

    @property
    def decider(self):
        """The batch-1 greedy decision path (``knoblib.decision.GreedyDecider``), built once."""
        if self._decider is None:
            from .decision import GreedyDecider

            self._decider = GreedyDecider(self.controller, self.language, self.table.reference_ms, self.guard)
        return self._decider

    @torch.inference_mode()
    def decide(
        self, question: str, budget_ms: float, stage2: bool = True, price: float = 0.0, image: torch.Tensor | None = None
    ) -> tuple[int, ...]:
        """The controller's decision for one request (budget ``inf``: none; a latency price), as option indices.

        Mode B: (tier, position, top_k, blocks). Mode A: (tier, position) only, since its
        Stage 2 reads the latency token during the forward; with ``stage2`` it also runs
        Stage 2 on a blank latency token, which costs what the pause will (to time it).
        The vision-aware Mode B (``config.vision_stats``) needs the request's ``image``.
        """
        if getattr(self.controller.config, "vision_stats", False):
            from .variants import vision_decide

            if image is None:
                raise ValueError("this controller's Stage 2 reads the image's vision statistics: pass image=")
            return vision_decide(self, self.vlm, question, budget_ms, price, image)
        decider = self.decider
        fitting = decider.fitting(budget_ms)
        shared = decider.features(question, budget_ms, price)
        tier, position = decider.stage1(shared, fitting)
        if self.mode == "B":
            return (tier, position, *decider.stage2(tier, position, fitting, shared))
        if stage2:
            blank = torch.zeros(1, self.controller.config.latency_dim)
            decider.stage2(tier, position, fitting, latency_token=blank)
        return tier, position

    def serve_one(
        self, vlm, image, question: str, budget_ms: float, answer_tokens: int, price: float = 0.0
    ) -> tuple[str, KnobConfig]:
        if getattr(self.controller.config, "vision_stats", False):
            from .variants import serve_vision_one

            return serve_vision_one(self, vlm, image, question, budget_ms, answer_tokens, price)
        decider = self.decider
        start = time.perf_counter()
        choice = self.decide(question, budget_ms, stage2=False, price=price)
        # Recorded for the serving report: the controller's share of the wall clock.
        self.last_decision_ms = (time.perf_counter() - start) * 1000.0
        if self.mode == "B":
            knobs = decider.knobs(*choice)
            return vlm.generate([image], [question], knobs, answer_tokens).answers[0], knobs
        # Mode A: Stage 2 decides at the pause, from the latency token, in the same forward.
        tier, position = choice
        fitting = decider.fitting(budget_ms)
        space = vlm.knob_space

        @torch.inference_mode()
        def at_pause(latency_tokens: torch.Tensor, rows: torch.Tensor) -> tuple[list[int], list[int]]:
            top_k, blocks = decider.stage2(tier, position, fitting, latency_token=latency_tokens.float())
            return [space.top_k_options[top_k]], [space.all_block_options[blocks]]

        ratio = torch.tensor([budget_ms / self.table.reference_ms], dtype=torch.float64)
        prices = torch.tensor([price], dtype=torch.float64) if self.controller.config.max_price > 0 else None
        out = vlm.generate(
            [image], [question], None, answer_tokens,
            probe_embeddings=self.controller.probe_embeddings(ratio, prices), decide=at_pause,
            stage1=[(space.tiers[tier], space.insertion_positions[position])],
        )
        return out.answers[0], out.knobs[0]



@dataclass
class MeasuredRow:
    """One policy at one budget, served one request at a time and timed by the wall clock.

    Attributes:
        policy, budget_ms, n: which policy, which budget (ms on this machine), how many requests.
        accuracy: exact-match accuracy of the served answers.
        mean_latency_ms / p50_latency_ms / p95_latency_ms: measured wall clock per request
            (the policy's decision plus the VLM's work).
        violation_rate: share of requests whose measured wall clock exceeded the budget.
        table_mean_latency_ms / table_violation_rate: the same from the latency table
            (median latency of each chosen configuration), for comparison.
        reserve_ms: budget the policy kept for its own decision.
    """

    policy: str
    budget_ms: float
    n: int
    accuracy: float
    mean_latency_ms: float
    p50_latency_ms: float
    p95_latency_ms: float
    violation_rate: float
    table_mean_latency_ms: float
    table_violation_rate: float
    reserve_ms: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _percentile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


@torch.inference_mode()
def measured_sweep(
    vlm: KnobVLM,
    policies: list,
    samples: list[VQASample],
    table: LatencyTable,
    budgets: list[float],
    answer_tokens: int | None = None,
    seed: int = 0,
    warmup: int = 10,
    progress: bool = True,
) -> list[MeasuredRow]:
    """Serve every request one at a time with every policy at every budget, and time it.

    Each policy is served as ``BudgetedVLM`` serves the controller (``knoblib.serving.Server``:
    its decision time reserved, the machine's drift followed, the full configuration above
    its latency). The policies take turns request by request (in a seeded shuffled order),
    so a slow spell of the machine costs each of them alike.
    """
    from tqdm.auto import tqdm

    from .serving import Server

    if not samples:
        raise ValueError("samples is empty: evaluate at least one request")
    budgets = check_budgets(list(budgets)).tolist()
    images = [s.image() for s in samples]
    # One machine, one estimate of its drift: every server reads the same monitor, fed by
    # all of their requests (knoblib.serving.Server explains why).
    monitor = Server.new_monitor(table)
    servers = [Server(vlm, policy, table, monitor=monitor) for policy in policies]
    for server in servers:
        server.warm_up(images, [s.question for s in samples], warmup)
    rng = random.Random(seed)
    records: dict[tuple[str, float], list[tuple[bool, float, float]]] = {}
    bar = tqdm(total=len(servers) * len(budgets) * len(samples), desc="serving", unit="request", disable=not progress)
    for budget in budgets:
        for sample, image in zip(samples, images):
            order = list(servers)
            rng.shuffle(order)
            for server in order:
                text, knobs, ms, _ = server.serve(image, sample.question, budget, answer_tokens)
                records.setdefault((server.name, budget), []).append((text == sample.answer, ms, table.latency(knobs)))
                bar.update(1)
    bar.close()
    rows = []
    for server in servers:
        for budget in budgets:
            rec = records[(server.name, budget)]
            wall = [ms for _, ms, _ in rec]
            table_ms = [t for _, _, t in rec]
            rows.append(
                MeasuredRow(
                    policy=server.name,
                    budget_ms=float(budget),
                    n=len(rec),
                    accuracy=sum(c for c, _, _ in rec) / len(rec),
                    mean_latency_ms=sum(wall) / len(wall),
                    p50_latency_ms=_percentile(wall, 0.5),
                    p95_latency_ms=_percentile(wall, 0.95),
                    violation_rate=sum(ms > budget for ms in wall) / len(wall),
                    table_mean_latency_ms=sum(table_ms) / len(table_ms),
                    table_violation_rate=sum(t > budget for t in table_ms) / len(table_ms),
                    reserve_ms=server.reserve_ms,
                )
            )
    return rows


def format_measured(rows: list[MeasuredRow]) -> str:
    """A plain-text table: per policy and budget, measured figures beside the table-based ones."""
    head = (
        f"{'policy':>22} | {'budget ms':>9} | {'acc':>5} | {'mean ms':>7} | {'p50':>6} | {'p95':>6} | "
        f"{'viol':>5} || {'table ms':>8} | {'table viol':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.policy[:22]:>22} | {r.budget_ms:>9.1f} | {r.accuracy:>5.3f} | {r.mean_latency_ms:>7.1f} | "
            f"{r.p50_latency_ms:>6.1f} | {r.p95_latency_ms:>6.1f} | {r.violation_rate:>5.3f} || "
            f"{r.table_mean_latency_ms:>8.1f} | {r.table_violation_rate:>10.3f}"
        )
    return "\n".join(lines)


# --- how much a content-aware policy could win at all ---------------------------------
def family_oracle_gap(
    table: LatencyTable,
    val_accuracy: dict[KnobConfig, dict[str, float]],
    budgets: list[float],
    score_accuracy: dict[KnobConfig, dict[str, float]] | None = None,
) -> list[dict]:
    """Per budget: the lookup table's validation accuracy vs a family-aware oracle's.

    The oracle knows each question's family and serves that family's most accurate
    configuration that fits (``FamilyTablePolicy``; its accuracy is the mean over
    families, which are balanced).
    It bounds what any controller that reads the question can win over the static table:
    when the two are equal, every family's best feasible configuration is the table's.

    Returns one dict per budget: ``budget_ms``, ``lookup`` (configuration, short form),
    ``lookup_accuracy``, ``oracle_accuracy``, ``oracle`` ({family: configuration}).
    With ``score_accuracy`` (another split's per-configuration accuracies, e.g. test),
    the same choices (made on validation) are also scored there: ``lookup_score`` and
    ``oracle_score``, which is what the choices are worth on data they were not picked on.
    """
    lookup = LookupTablePolicy(table, val_accuracy)
    per_family = FamilyTablePolicy(table, val_accuracy)
    rows = []
    for budget in budgets:
        chosen = lookup.choose_one(budget)
        best = {f: per_family.choose_one(f, budget) for f in FAMILIES}
        rows.append(
            {
                "budget_ms": float(budget),
                "lookup": chosen.short(),
                "lookup_accuracy": val_accuracy[chosen]["all"],
                "oracle_accuracy": sum(val_accuracy[best[f]][f] for f in FAMILIES) / len(FAMILIES),
                "oracle": {f: k.short() for f, k in best.items()},
            }
        )
        if score_accuracy is not None:
            rows[-1]["lookup_score"] = score_accuracy[chosen]["all"]
            rows[-1]["oracle_score"] = sum(score_accuracy[best[f]][f] for f in FAMILIES) / len(FAMILIES)
    return rows
