"""The accuracy / mean-latency plane: what a controller buys, against what no controller could beat.

Two ways to serve a stream of requests under latency:

* **per-request budget** (``kind="budget"``): every request must finish within B. A
  policy's point at B is (mean latency, accuracy); the baseline is the lookup table (the
  most accurate configuration on validation that fits B), and the ceiling is the
  per-request oracle: for each question the cheapest configuration that answers it right
  within B. A controller can win *latency at equal accuracy*: questions that need no
  expensive knob go to cheap configurations.
* **average-latency budget** (``kind="target"``): the stream's *mean* latency must meet
  a target T, and a request may spend more or less than T. The content-agnostic way to
  hit any T is the convex hull of the static front: a seeded random mix of two
  configurations. A controller with a latency price (``knoblib.reward``) sets the price
  that meets T on validation (``find_price``) and can win *accuracy at equal mean
  latency*. The ceiling is the per-request oracle with a mean-latency budget.

Every choice is made on validation and scored on test: the static front, the hull and the
lookup table rank configurations by validation accuracy; the controllers' prices are found
on validation. Accuracies come from per-sample correctness (``knoblib.correctness``), so a
policy's test accuracy is exactly what running the VLM with its choices answers, and
latencies are this machine's table medians (measured serving: ``evaluate --measured``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .correctness import Correctness
from .data import FAMILIES
from .knobs import KnobConfig
from .latency import LatencyTable

KINDS = ("budget", "target")
# Every policy on the plane that is not a trained controller (baselines and ceilings).
BASELINES = (
    "lookup table", "random feasible", "full model", "per-family oracle", "per-request oracle",
    "static hull (random mix)", "best single configuration", "per-family mix (oracle)",
)


@dataclass
class PlanePoint:
    """One policy at one budget (``kind="budget"``) or target mean latency (``kind="target"``).

    Attributes:
        policy: the policy's name.
        kind: ``budget`` or ``target``.
        x: the budget or the target, ms on this machine.
        accuracy: test accuracy.
        mean_latency_ms: mean latency of the chosen configurations (this machine's table medians).
        violation_rate: share of requests whose configuration's median exceeds the budget
            (0 for a target: there is no per-request cap).
        price: the latency price used (controllers in the average mode), else None
            (the mean over seeds for several).
        seeds: how many trained controllers (seeds) the point averages.
        accuracy_ci / mean_latency_ms_ci: 95 % intervals (bootstrap over test requests and seeds).
        accuracy_vs_baseline: [mean, low, high] of the accuracy difference to the baseline,
            paired on the same requests: for a budget the lookup table at the same budget; for
            a target the static hull at the mean latency this policy reached on test (equal
            mean latency, whether or not the price found on validation hit the target).
        latency_saving_vs_baseline: [mean, low, high] of ``1 - mean latency / baseline's``.
    """

    policy: str
    kind: str
    x: float
    accuracy: float
    mean_latency_ms: float
    violation_rate: float
    price: float | None = None
    seeds: int = 1
    accuracy_ci: list[float] | None = None
    mean_latency_ms_ci: list[float] | None = None
    accuracy_vs_baseline: list[float] | None = None
    latency_saving_vs_baseline: list[float] | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --- the static front and its hull -----------------------------------------------------
def static_front(accuracy: dict[KnobConfig, float], table: LatencyTable) -> list[KnobConfig]:
    """The Pareto-optimal configurations: no other one is both faster (median) and at least as accurate."""
    ranked = sorted(accuracy, key=lambda k: (table.latency(k), -accuracy[k]))
    front, best = [], -math.inf
    for knobs in ranked:
        if accuracy[knobs] > best:
            front.append(knobs)
            best = accuracy[knobs]
    return front


def upper_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the upper concave hull of (x, y) points, left to right (a monotone chain).

    Only its rising part matters here (more latency for less accuracy is never mixed in):
    the hull ends at the most accurate point.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    hull: list[int] = []
    for i in order:
        while len(hull) >= 2:
            (x1, y1), (x2, y2), (x3, y3) = points[hull[-2]], points[hull[-1]], points[i]
            # Drop the middle point when it lies on or below the chord (not concave).
            if (x2 - x1) * (y3 - y1) - (y2 - y1) * (x3 - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    top = max(hull, key=lambda i: (points[i][1], -points[i][0]))
    return hull[: hull.index(top) + 1]


@dataclass
class HullMix:
    """The content-agnostic way to meet a mean latency: mix two hull configurations at random.

    For a target T between the latencies of two neighbouring hull vertices a < b, each
    request is served by b with probability ``w = (T - L_a) / (L_b - L_a)``, else by a:
    the expected mean latency is T. Below the fastest vertex it serves the fastest,
    above the slowest the slowest.
    """

    vertices: list[KnobConfig]
    table: LatencyTable

    @classmethod
    def from_accuracy(cls, accuracy: dict[KnobConfig, float], table: LatencyTable) -> "HullMix":
        front = static_front(accuracy, table)
        points = [(table.latency(k), accuracy[k]) for k in front]
        return cls([front[i] for i in upper_hull(points)], table)

    def weights(self, target_ms: float) -> list[tuple[KnobConfig, float]]:
        """(configuration, probability) pairs that meet ``target_ms`` on average."""
        lat = [self.table.latency(k) for k in self.vertices]
        if target_ms <= lat[0]:
            return [(self.vertices[0], 1.0)]
        if target_ms >= lat[-1]:
            return [(self.vertices[-1], 1.0)]
        j = next(i for i in range(1, len(lat)) if lat[i] >= target_ms)
        w = (target_ms - lat[j - 1]) / (lat[j] - lat[j - 1])
        return [(self.vertices[j - 1], 1.0 - w), (self.vertices[j], w)]

    def choose(self, target_ms: float, n: int, seed: int = 0) -> list[KnobConfig]:
        """One configuration per request, drawn with :meth:`weights` (seeded)."""
        pairs = self.weights(target_ms)
        rng = random.Random(seed)
        return [rng.choices([k for k, _ in pairs], [w for _, w in pairs])[0] for _ in range(n)]


# --- oracles ------------------------------------------------------------------------------
def oracle_for_budget(correctness: Correctness, table: LatencyTable, budget_ms: float, quantile: float) -> tuple[float, float]:
    """The per-request oracle under a cap: (accuracy, mean latency ms).

    For each question, the cheapest configuration that answers it right among those that
    fit ``budget_ms`` (at ``quantile``, as the guard reads them); the cheapest fitting one if
    none does. Only a ceiling: it reads the answers.
    """
    latency = table.latencies(correctness.configs)
    fits = table.latencies(correctness.configs, quantile) <= max(budget_ms, table.latency(table.fastest(), quantile))
    cost = torch.where(fits, latency, torch.full_like(latency, math.inf))
    cheapest = float(cost.min())
    right = correctness.correct & fits[None, :]
    best_right = torch.where(right, cost[None, :], torch.full_like(cost[None, :], math.inf)).min(1).values
    solved = torch.isfinite(best_right)
    chosen = torch.where(solved, best_right, torch.full_like(best_right, cheapest))
    return float(solved.float().mean()), float(chosen.mean())


def oracle_for_target(correctness: Correctness, table: LatencyTable, target_ms: float) -> tuple[float, float]:
    """The per-request oracle under a mean-latency budget: (accuracy, mean latency ms).

    Each question either gets its cheapest right configuration or, unanswerable or not
    worth it, the cheapest configuration of all. Buying right answers in order of their
    extra cost over the cheapest configuration, until the mean reaches ``target_ms``, is
    optimal (every right answer is worth the same).
    """
    latency = table.latencies(correctness.configs)
    cheapest = float(latency.min())
    best_right = torch.where(correctness.correct, latency[None, :], torch.full_like(latency[None, :], math.inf)).min(1).values
    extra = (best_right - cheapest)[torch.isfinite(best_right)].sort().values
    n = len(correctness)
    allowance = n * (target_ms - cheapest)
    spent, bought = 0.0, 0
    for cost in extra.tolist():
        if spent + cost > allowance:
            break
        spent, bought = spent + cost, bought + 1
    return bought / n, cheapest + spent / n


def family_mix(
    val_accuracy: dict[KnobConfig, dict[str, float]], table: LatencyTable, price: float
) -> dict[str, KnobConfig]:
    """Per family, the configuration with the best ``accuracy - price * latency / full latency`` on validation.

    The per-family oracle of the average mode (it reads the family label; an analysis bound).
    """
    reference = table.reference_ms
    return {
        family: max(val_accuracy, key=lambda k: (val_accuracy[k][family] - price * table.latency(k) / reference, -table.latency(k)))
        for family in FAMILIES
    }


# --- finding the price of a target ------------------------------------------------------------
def find_price(
    mean_latency_at: Callable[[float], float], target_ms: float, max_price: float, iterations: int = 30
) -> float:
    """The latency price whose mean latency meets ``target_ms``, by bisection on [0, max_price].

    ``mean_latency_at(price)`` is the policy's mean latency on validation at that price;
    it falls as the price rises (a dearer millisecond buys fewer of them). Returns the
    smallest price found whose mean latency is at most the target (``max_price`` if even
    that one is above it, 0 if price 0 already meets it).
    """
    if not (math.isfinite(target_ms) and target_ms > 0):
        raise ValueError(f"target_ms={target_ms!r} is invalid: must be a finite number > 0")
    if not (math.isfinite(max_price) and max_price > 0):
        raise ValueError(f"max_price={max_price!r} is invalid: the policy must have a price input")
    if mean_latency_at(0.0) <= target_ms:
        return 0.0
    if mean_latency_at(max_price) > target_ms:
        return max_price
    lo, hi = 0.0, max_price
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mean_latency_at(mid) <= target_ms:
            hi = mid
        else:
            lo = mid
    return hi


# --- shares of the oracle ----------------------------------------------------------------------
def saving_share(table_ms: float, policy_ms: float, oracle_ms: float) -> float | None:
    """The share of the oracle's latency saving over the lookup table that a policy captures (None if the oracle saves nothing)."""
    if table_ms - oracle_ms <= 1e-9:
        return None
    return (table_ms - policy_ms) / (table_ms - oracle_ms)


def gain_share(hull_accuracy: float, policy_accuracy: float, oracle_accuracy: float) -> float | None:
    """The share of the oracle's accuracy gain over the static hull that a policy captures (None if no gain)."""
    if oracle_accuracy - hull_accuracy <= 1e-9:
        return None
    return (policy_accuracy - hull_accuracy) / (oracle_accuracy - hull_accuracy)


# --- the whole plane ----------------------------------------------------------------------------
@torch.no_grad()
def controller_choices(vlm, controller, samples, table: LatencyTable, budgets_ms: torch.Tensor, prices=None, quantile=None):
    """Each request's greedy configuration under its budget (``inf``: none) and price.

    Mode B decides from the question alone (no VLM run); Mode A runs the resumable forward
    to read its latency token.
    """
    from .features import LanguageFeatureExtractor
    from .grpo import run_controller
    from .guard import DEFAULT_QUANTILE, BudgetGuard

    guard = BudgetGuard(table, vlm.knob_space, quantile or DEFAULT_QUANTILE) if controller.config.budget_guard else None
    language = LanguageFeatureExtractor.from_vlm(vlm)
    prices = None if controller.config.max_price == 0 else prices
    knobs = []
    for start in range(0, len(samples), 100):
        chunk = samples[start : start + 100]
        b = budgets_ms[start : start + 100]
        p = None if prices is None else prices[start : start + 100]
        if controller.mode == "B":
            lang = language([s.question for s in chunk])
            feat = controller.encode_budget(table.relative(b), p)
            mask = guard.mask(b) if guard is not None else None
            vision = None
            if getattr(controller.config, "vision_stats", False):  # the vision-aware Mode B reads the image too
                from .vision_features import vision_statistics_all_tiers

                vision = vision_statistics_all_tiers(vlm, [s.image() for s in chunk])
            knobs += controller.sample(lang, feat, mask, greedy=True, vision_feat=vision).to_knobs(vlm.knob_space)
        else:
            run = run_controller(
                vlm, controller, language, [s.image() for s in chunk], [s.question for s in chunk], b, table,
                "A-resumable", 2, greedy=True, guard=guard, prices=p,
            )
            knobs += run.knobs
    return knobs


def per_request(correctness: Correctness, table: LatencyTable, samples, knobs: Sequence[KnobConfig]):
    """(right (n,) float, latency (n,) ms) of serving each sample with its configuration."""
    rows = torch.tensor([correctness.row(s.uid) for s in samples])
    columns = torch.tensor([correctness.column(k) for k in knobs])
    return correctness.correct[rows, columns].float(), table.latencies(knobs).float()


def bootstrap(values: torch.Tensor, baseline: torch.Tensor | None = None, resamples: int = 1000, seed: int = 0, ratio: bool = False):
    """[mean, low, high] (95 %) of a statistic over seeds x requests, resampling both.

    Args:
        values: (S, n) per seed and request.
        baseline: (n,) per request, paired with ``values`` (same requests); the statistic
            becomes ``mean(values) - mean(baseline)``, or with ``ratio`` ``1 - mean(values) / mean(baseline)``.
    """
    generator = torch.Generator().manual_seed(seed)
    s, n = values.shape

    def statistic(v, b):
        if b is None:
            return v.mean()
        return 1 - v.mean() / b.mean() if ratio else v.mean() - b.mean()

    draws = []
    for _ in range(resamples):
        seeds = torch.randint(s, (s,), generator=generator)
        requests = torch.randint(n, (n,), generator=generator)
        draws.append(float(statistic(values[seeds][:, requests], None if baseline is None else baseline[requests])))
    ordered = sorted(draws)
    return [float(statistic(values, baseline)), ordered[int(0.025 * resamples)], ordered[int(0.975 * resamples) - 1]]


def score(correctness: Correctness, samples, knobs: Sequence[KnobConfig]) -> float:
    """Accuracy of serving each sample with its configuration, from per-sample correctness."""
    rows = [correctness.row(s.uid) for s in samples]
    return float(sum(bool(correctness.correct[r, correctness.column(k)]) for r, k in zip(rows, knobs)) / len(rows))


def evaluate_plane(
    vlm,
    controllers: dict,
    table: LatencyTable,
    val: Correctness,
    test: Correctness,
    val_samples,
    test_samples,
    budgets: Sequence[float],
    targets: Sequence[float],
    quantile: float,
    progress: bool = True,
) -> dict:
    """Every policy on the plane, per-request budgets and target mean latencies (see the module docstring).

    Args:
        controllers: name -> trained ``TwoStageController``; those with a price input
            (``config.max_price > 0``) are also placed at the targets.
        val, test: per-sample correctness of every configuration on the two splits.
        val_samples, test_samples: the samples those tables cover (choices on val, scores on test).
        budgets, targets: ms on this machine.
        quantile: the budget guard's quantile.

    Returns:
        ``{"points": [PlanePoint.as_dict()...], "hull": [[ms, accuracy]...] (test-scored,
        vertices chosen on val), "static": [[ms, accuracy, label]...] (every configuration
        on test), "shares": {...}}``.
    """
    from tqdm.auto import tqdm

    from .evaluate import FamilyTablePolicy, LookupTablePolicy, RandomFeasiblePolicy

    val_acc = val.accuracy()
    test_acc = test.accuracy()
    lookup = LookupTablePolicy(table, val_acc, quantile)
    per_family = FamilyTablePolicy(table, val_acc, quantile, ties="faster")
    random_policy = RandomFeasiblePolicy(table, seed=0, quantile=quantile)
    n = len(test_samples)
    points: list[PlanePoint] = []

    baselines: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(policy, kind, x, knobs, price=None, baseline=None):
        """``knobs``: one list of configurations per request, or a list of such lists (one per seed)."""
        per_seed = knobs if knobs and isinstance(knobs[0], list) else [knobs]
        right, latency = (torch.stack(t) for t in zip(*(per_request(test, table, test_samples, k) for k in per_seed)))
        violation = float((latency > x).float().mean()) if kind == "budget" else 0.0
        point = PlanePoint(
            policy, kind, float(x), float(right.mean()), float(latency.mean()), violation,
            None if price is None else float(sum(price) / len(price) if isinstance(price, list) else price),
            seeds=len(per_seed), accuracy_ci=bootstrap(right)[1:], mean_latency_ms_ci=bootstrap(latency)[1:],
        )
        if baseline is not None:
            # A target's baseline is the hull at the mean latency the policy reached on test,
            # not at the target: a price found on validation can miss it, in either direction.
            base_right, base_latency = baseline(float(latency.mean())) if callable(baseline) else baselines[kind, float(x)]
            point.accuracy_vs_baseline = bootstrap(right, base_right)
            point.latency_saving_vs_baseline = bootstrap(latency, base_latency, ratio=True)
        points.append(point)
        if policy in (lookup.name, "static hull (random mix)"):
            baselines[kind, float(x)] = (right[0], latency[0])

    def choices(controller, b, prices=None, samples=test_samples):
        group = controller if isinstance(controller, list) else [controller]
        return [controller_choices(vlm, c, samples, table, b, prices, quantile) for c in group]

    # Per-request budgets.
    for budget in tqdm(list(budgets), desc="budgets", disable=not progress):
        b = torch.full((n,), float(budget), dtype=torch.float64)
        add(lookup.name, "budget", budget, [lookup.choose_one(budget)] * n)
        for name, controller in controllers.items():
            add(name, "budget", budget, choices(controller, b), baseline=True)
        add(random_policy.name, "budget", budget, [random_policy.choose_one(budget) for _ in range(n)])
        add("full model", "budget", budget, [vlm.knob_space.full()] * n)
        add("per-family oracle", "budget", budget, [per_family.choose_one(s.family, budget) for s in test_samples])
        accuracy, mean_ms = oracle_for_budget(test, table, budget, quantile)
        points.append(PlanePoint("per-request oracle", "budget", float(budget), accuracy, mean_ms, 0.0))

    # Target mean latencies: the hull (val vertices, test scores), the best single
    # configuration, the per-family mix, the oracle and the priced controllers.
    hull = HullMix.from_accuracy({k: v["all"] for k, v in val_acc.items()}, table)
    hull_test = [[table.latency(k), test_acc[k]["all"]] for k in hull.vertices]
    reference = table.reference_ms

    def hull_at(mean_ms: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The hull's random mix at ``mean_ms``, per test request: (correct, latency)."""
        return per_request(test, table, test_samples, hull.choose(mean_ms, n, seed=0))

    for target in tqdm(list(targets), desc="targets", disable=not progress):
        add("static hull (random mix)", "target", target, hull.choose(target, n, seed=0))
        fits = [k for k in val_acc if table.latency(k) <= target]
        single = max(fits, key=lambda k: (val_acc[k]["all"], -table.latency(k))) if fits else table.fastest()
        add("best single configuration", "target", target, [single] * n)
        price = find_price(
            lambda p: sum(table.latency(k) for k in (lambda m: [m[s.family] for s in val_samples])(family_mix(val_acc, table, p)))
            / len(val_samples),
            target,
            max_price=8.0,
        )
        mix = family_mix(val_acc, table, price)
        add("per-family mix (oracle)", "target", target, [mix[s.family] for s in test_samples], price)
        accuracy, mean_ms = oracle_for_target(test, table, target)
        points.append(PlanePoint("per-request oracle", "target", float(target), accuracy, mean_ms, 0.0))
        for name, group in controllers.items():
            group = group if isinstance(group, list) else [group]
            if group[0].config.max_price <= 0:
                continue
            inf = torch.full((len(val_samples),), math.inf, dtype=torch.float64)
            per_seed, found = [], []
            for controller in group:

                def mean_latency_at(p, controller=controller, inf=inf):
                    prices = torch.full((len(val_samples),), p, dtype=torch.float64)
                    knobs = controller_choices(vlm, controller, val_samples, table, inf, prices, quantile)
                    return float(table.latencies(knobs).mean())

                price = find_price(mean_latency_at, target, controller.config.max_price, iterations=12)
                prices = torch.full((n,), price, dtype=torch.float64)
                inf_test = torch.full((n,), math.inf, dtype=torch.float64)
                per_seed.append(controller_choices(vlm, controller, test_samples, table, inf_test, prices, quantile))
                found.append(price)
            add(name, "target", target, per_seed, found, baseline=hull_at)

    return {
        "points": [p.as_dict() for p in points],
        "hull": hull_test,
        "static": [[table.latency(k), test_acc[k]["all"], k.short()] for k in test_acc],
        "shares": shares(points),
        "reference_ms": reference,
        "quantile": quantile,
    }


def shares(points: Sequence[PlanePoint]) -> dict:
    """Per controller: the share of the per-request oracle's latency saving over the lookup table
    (budgets, mean over the budgets where the oracle saves anything) and of its accuracy gain over
    the static hull (targets, mean over the targets where it gains)."""
    by = {(p.policy, p.kind, p.x): p for p in points}
    names = {p.policy for p in points} - set(BASELINES)
    result = {}
    for name in sorted(names):
        saving = [
            saving_share(by["lookup table", "budget", x].mean_latency_ms, p.mean_latency_ms, by["per-request oracle", "budget", x].mean_latency_ms)
            for (policy, kind, x), p in by.items() if policy == name and kind == "budget"
        ]
        gain = [
            gain_share(p.accuracy - p.accuracy_vs_baseline[0], p.accuracy, by["per-request oracle", "target", x].accuracy)
            for (policy, kind, x), p in by.items() if policy == name and kind == "target" and p.accuracy_vs_baseline
        ]
        saving = [s for s in saving if s is not None]
        gain = [g for g in gain if g is not None]
        result[name] = {
            "oracle_saving_share": sum(saving) / len(saving) if saving else None,
            "oracle_gain_share": sum(gain) / len(gain) if gain else None,
        }
    return result


def format_plane(plane: dict) -> str:
    """Plain-text tables: per budget and per target, each policy's accuracy and mean latency."""
    lines = []
    for kind, title in (("budget", "per-request budget"), ("target", "target mean latency")):
        points = [p for p in plane["points"] if p["kind"] == kind]
        if not points:
            continue
        policies = list(dict.fromkeys(p["policy"] for p in points))
        xs = sorted({p["x"] for p in points})
        by = {(p["policy"], p["x"]): p for p in points}
        head = f"{title + ' ms':>26} | " + " | ".join(f"{x:>13.1f}" for x in xs) + " |          mean"
        lines += ["", head, "-" * len(head)]
        for policy in policies:
            row = [by.get((policy, x)) for x in xs]
            cells = [f"{p['accuracy']:.3f} {p['mean_latency_ms']:6.1f}" if p else " " * 12 for p in row]
            got = [p for p in row if p]
            mean = f"{sum(p['accuracy'] for p in got) / len(got):.3f} {sum(p['mean_latency_ms'] for p in got) / len(got):6.1f}"
            lines.append(f"{policy[:26]:>26} | " + " | ".join(f"{c:>13}" for c in cells) + f" | {mean}")
    lines.append("(each cell: test accuracy, mean latency ms)")
    for name, share in plane.get("shares", {}).items():
        parts = [f"{k.replace('_', ' ')} {v:.2f}" for k, v in share.items() if v is not None]
        if parts:
            lines.append(f"{name}: " + ", ".join(parts))
    return "\n".join(lines)


def choices_by_family(vlm, controller, samples, table: LatencyTable, budgets: Sequence[float], quantile: float) -> dict:
    """What a controller picks, per question family and budget: {family: {budget: {configuration: share}}}."""
    result: dict[str, dict[float, dict[str, float]]] = {f: {} for f in FAMILIES}
    for budget in budgets:
        b = torch.full((len(samples),), float(budget), dtype=torch.float64)
        knobs = controller_choices(vlm, controller, samples, table, b, quantile=quantile)
        for family in FAMILIES:
            picks = [k.short() for k, s in zip(knobs, samples) if s.family == family]
            counts = {label: picks.count(label) / len(picks) for label in dict.fromkeys(picks)} if picks else {}
            result[family][float(budget)] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return result
