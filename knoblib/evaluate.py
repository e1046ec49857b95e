"""Evaluation: per-configuration accuracy, the knob table, and the budget sweep.

A *policy* maps (requests, budgets) to one ``KnobConfig`` per request and answers them.
The sweep compares, at each budget of a held-out split:

* the trained controller (Mode A, resumable, and Mode B), acting greedily;
* the static lookup table: the configuration with the best validation accuracy whose
  profiled latency fits the budget (content-agnostic: the baseline to beat);
* a random feasible policy: uniform over the configurations that fit;
* the full model, whatever the budget.

Latency is the profiled latency of each chosen configuration served alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import FAMILIES, VQASample
from .knobs import KnobConfig, KnobSpace
from .latency import LatencyTable
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

    images = [s.image() for s in samples] if images is None else images
    result = {}
    for knobs in tqdm(configs, desc="configurations", disable=not progress):
        hits = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            out = vlm.generate(images[start : start + batch_size], [s.question for s in chunk], knobs)
            hits += [a == s.answer for a, s in zip(out.answers, chunk)]
        result[knobs] = _family_accuracy(samples, hits)
    return result


def _family_accuracy(samples: list[VQASample], hits: list[bool]) -> dict[str, float]:
    acc = {"all": sum(hits) / max(1, len(hits))}
    for family in FAMILIES:
        fam = [h for h, s in zip(hits, samples) if s.family == family]
        acc[family] = sum(fam) / len(fam) if fam else float("nan")
    return acc


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
class LookupTablePolicy:
    """The best-validation-accuracy configuration whose latency fits the budget (fastest if none fits)."""

    name = "lookup table"

    def __init__(self, table: LatencyTable, val_accuracy: dict[KnobConfig, dict[str, float]]):
        self.table = table
        # Ties go to the faster configuration.
        self.ranked = sorted(val_accuracy, key=lambda k: (-val_accuracy[k]["all"], table.latency(k)))

    def choose_one(self, budget: float) -> KnobConfig:
        for knobs in self.ranked:
            if self.table.latency(knobs) <= budget:
                return knobs
        return self.table.fastest()

    def choose(self, vlm, samples, images, budgets: torch.Tensor) -> tuple[list[KnobConfig], list[str]]:
        knobs = [self.choose_one(b) for b in budgets.tolist()]
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers


class FamilyTablePolicy:
    """A lookup table per question family: the configuration most accurate *for the
    request's family* on validation whose latency fits the budget (fastest if none fits).

    Ties go to the overall table's order (more accurate over every family, then faster),
    so it departs from ``LookupTablePolicy`` only where validation shows a strict gain
    for that family. It reads each request's family, a label of the synthetic data that
    a served controller never sees (it sees the question), so it is a bound
    (``family_oracle_gap``) and a teacher for the Mode-B warm start
    (``JointGRPOTrainer.warm_start``), not a baseline.
    """

    name = "family table"

    def __init__(self, table: LatencyTable, val_accuracy: dict[KnobConfig, dict[str, float]]):
        self.table = table
        self.ranked = {
            f: sorted(val_accuracy, key=lambda k, f=f: (-val_accuracy[k][f], -val_accuracy[k]["all"], table.latency(k)))
            for f in FAMILIES
        }

    def choose_one(self, family: str, budget: float) -> KnobConfig:
        if family not in self.ranked:
            raise ValueError(f"family={family!r} is invalid: allowed {list(self.ranked)}")
        for knobs in self.ranked[family]:
            if self.table.latency(knobs) <= budget:
                return knobs
        return self.table.fastest()

    def choose(self, vlm, samples, images, budgets: torch.Tensor) -> tuple[list[KnobConfig], list[str]]:
        knobs = [self.choose_one(s.family, b) for s, b in zip(samples, budgets.tolist())]
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers


class RandomFeasiblePolicy:
    """Uniform over the configurations whose latency fits the budget (fastest if none fits)."""

    name = "random feasible"

    def __init__(self, table: LatencyTable, seed: int = 0):
        self.table = table
        self.rng = random.Random(seed)

    def choose(self, vlm, samples, images, budgets: torch.Tensor):
        knobs = []
        for b in budgets.tolist():
            feasible = self.table.feasible(b)
            knobs.append(self.rng.choice(feasible) if feasible else self.table.fastest())
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers


class FullModelPolicy:
    """Always the full configuration."""

    name = "full model"

    def choose(self, vlm, samples, images, budgets: torch.Tensor):
        knobs = [vlm.knob_space.full()] * len(samples)
        return knobs, vlm.generate(images, [s.question for s in samples], knobs).answers


class ControllerPolicy:
    """A trained ``TwoStageController`` acting greedily (Mode B, or Mode A with a resumable forward)."""

    def __init__(self, controller, vlm: KnobVLM, name: str | None = None, table: LatencyTable | None = None):
        from .features import LanguageFeatureExtractor
        from .guard import BudgetGuard

        self.controller = controller.eval()
        # Served as trained: with the budget guard when the controller was trained with it.
        self.guard = None
        if getattr(controller.config, "budget_guard", False):
            if table is None:
                raise ValueError("this controller was trained with the budget guard: pass the latency table")
            self.guard = BudgetGuard(table, vlm.knob_space)
        self.mode = "B" if controller.config.mode == "B" else "A-resumable"
        self.language = LanguageFeatureExtractor(vlm.input_embeddings, vlm.tokenizer)
        self.name = name or f"controller (Mode {controller.config.mode})"

    def choose(self, vlm, samples, images, budgets: torch.Tensor):
        from .grpo import run_controller

        run = run_controller(
            vlm,
            self.controller,
            self.language,
            images,
            [s.question for s in samples],
            budgets,
            self.mode,
            3,
            greedy=True,
            guard=self.guard,
        )
        return run.knobs, run.answers


# --- the sweep --------------------------------------------------------------------
@dataclass
class SweepRow:
    """One policy at one budget."""

    policy: str
    budget_ms: float
    accuracy: float
    latency_over_budget: float
    violation_rate: float
    mean_latency_ms: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def budget_sweep(
    vlm: KnobVLM,
    policies: list,
    samples: list[VQASample],
    table: LatencyTable,
    budgets: list[float],
    batch_size: int = 100,
    progress: bool = True,
) -> list[SweepRow]:
    """Every policy at every budget on ``samples``; latency from the table."""
    from tqdm.auto import tqdm

    images = [s.image() for s in samples]
    rows = []
    for policy in tqdm(policies, desc="policies", disable=not progress):
        for budget in budgets:
            hits, ratios, violations, lat = [], [], [], []
            for start in range(0, len(samples), batch_size):
                chunk = samples[start : start + batch_size]
                b = torch.full((len(chunk),), float(budget), dtype=torch.float64)
                knobs, answers = policy.choose(vlm, chunk, images[start : start + batch_size], b)
                latency = table.latencies(knobs)
                hits += [a == s.answer for a, s in zip(answers, chunk)]
                ratios += (latency / budget).tolist()
                violations += (latency > budget).tolist()
                lat += latency.tolist()
            rows.append(
                SweepRow(
                    policy=policy.name,
                    budget_ms=float(budget),
                    accuracy=sum(hits) / len(hits),
                    latency_over_budget=sum(ratios) / len(ratios),
                    violation_rate=sum(violations) / len(violations),
                    mean_latency_ms=sum(lat) / len(lat),
                )
            )
    return rows


def format_sweep(rows: list[SweepRow]) -> str:
    """A plain-text table: one line per budget, accuracy / violation per policy."""
    policies = list(dict.fromkeys(r.policy for r in rows))
    budgets = sorted({r.budget_ms for r in rows})
    by = {(r.policy, r.budget_ms): r for r in rows}
    head = f"{'budget ms':>10} | " + " | ".join(f"{p[:24]:>24}" for p in policies)
    lines = [head, "-" * len(head)]
    for b in budgets:
        cells = [f"acc {by[p, b].accuracy:.3f} viol {by[p, b].violation_rate:.2f}" for p in policies]
        lines.append(f"{b:>10.1f} | " + " | ".join(f"{c:>24}" for c in cells))
    means = [sum(by[p, b].accuracy for b in budgets) / len(budgets) for p in policies]
    lines.append(f"{'mean acc':>10} | " + " | ".join(f"{m:>24.3f}" for m in means))
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
