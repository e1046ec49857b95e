"""Beyond Mode B: the vision-aware Mode B, the distilled Mode B and the hybrid, side by side.

The original system ends with three ideas for when Mode B loses accuracy to Mode A; knoblib
builds all three as options of the same controller and trainer:

* **vision-aware Mode B** (``train --vision-stats``, ``ControllerConfig.vision_stats``):
  Stage 2 also reads the mean and std of the vision features at the tier Stage 1 chose
  (``knoblib.vision_features``);
* **distilled Mode B** (``train --distill-from DIR --distill-steps N --distill-coef C``):
  a Mode-B student matches a trained Mode-A teacher's policy, then GRPO (``knoblib.distill``);
* **the hybrid** (``train --hybrid``, ``ControllerConfig.hybrid``): one Stage 1, a Mode-B
  head trained by GRPO on batched rollouts, a Mode-A head trained from the same rollouts;
  it serves either way (``TwoStageController.served_as``).

This module names them, serves the vision-aware one (Stage 1, then the vision
statistics, then Stage 2, then the generate that reuses the vision features), and
compares every variant in one run (``python -m knoblib evaluate --variants``, which writes
``variants.json``): accuracy per per-request budget and over the sweep, mean latency and
violation rate (``knoblib.plane``: choices on val, scores on test from per-sample
correctness), training time per GRPO step (the variants' steps interleaved in rounds on
this machine) and serving overhead per request at batch 1 (a served request's wall clock
minus a plain generate of the same configuration, interleaved request by request).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .controller import TwoStageController
from .data import data_path

# The shipped controllers, in the table's order (those whose folder exists are evaluated).
SHIPPED = ("controller_A", "controller_B", "controller_B_vision", "controller_B_distilled", "controller_hybrid")
# The shipped recipe's settings that change what a GRPO step computes (the timing's trainers use them).
RECIPE = {"average_fraction": 0.5, "kl_coef": 0.05}
# Alongside GRPO, the distilled student and the hybrid's A head read a distillation KL
# (knoblib.distill); the Makefile's artifacts recipe trains them with these weights.
DISTILL_COEF = {"distilled": 0.1, "hybrid": 0.1}
# The bar the variants are held to: Mode A's mean accuracy over the sweep (within this
# many points) at Mode B's training cost per step (within this factor).
ACCURACY_SLACK = 0.005
COST_FACTOR = 1.15


# --- names -----------------------------------------------------------------------------
def controller_kind(controller: TwoStageController) -> str:
    """What a controller is: ``Mode A``, ``Mode B``, ``Mode B + vision``, ``Mode B, distilled``,
    ``hybrid as A`` / ``hybrid as B`` (a view of a hybrid, ``served_as``) or ``hybrid``."""
    config = controller.config
    view = getattr(controller, "hybrid_view", None)
    if view is not None:
        return f"hybrid as {view}"
    if getattr(config, "hybrid", False):
        return "hybrid"
    kind = f"Mode {config.mode}"
    if getattr(config, "vision_stats", False):
        kind += " + vision"
    if getattr(config, "distilled_from", ""):
        kind += ", distilled"
    return kind


def is_variant(controller: TwoStageController) -> bool:
    """Whether a controller is one of the variants beyond Mode A and Mode B (vision-aware, distilled, hybrid)."""
    config = controller.config
    # A hybrid served one way is a view with a plain config: ``hybrid_view`` marks it.
    return bool(config.vision_stats or config.hybrid or config.distilled_from or getattr(controller, "hybrid_view", None))


def controller_name(controller: TwoStageController) -> str:
    """The name a controller's points and rows carry: ``controller (Mode B)``, ``controller (hybrid as A)``, ...

    The budget-only ablation is ``budget-only controller (Mode B)``.
    """
    prefix = "controller" if controller.config.use_question else "budget-only controller"
    return f"{prefix} ({controller_kind(controller)})"


def load_controllers(paths, space=None, sources: dict | None = None) -> dict[str, TwoStageController]:
    """name -> controller for each folder (default: the shipped ones that exist); a hybrid appears twice,
    served as A and as B (views sharing its weights). ``sources``, if given, receives name -> folder."""
    if paths is None:
        paths = [data_path(name) for name in SHIPPED if data_path(name).is_dir()]
    named: dict[str, TwoStageController] = {}
    for path in paths:
        controller = TwoStageController.load(path, expected_space=space)
        views = [controller.served_as(m) for m in ("A", "B")] if controller.config.hybrid else [controller]
        for view in views:
            name = controller_name(view)
            if name in named:
                name = f"{name} [{Path(path).name}]"
            named[name] = view
            if sources is not None:
                sources[name] = Path(path)
    return named


def fingerprint(folder: Path) -> str:
    """The first 12 hex digits of the sha256 of a controller folder's weights (which file a number came from)."""
    import hashlib

    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:12]


def expand_hybrids(policies: list) -> list:
    """The policies with each hybrid controller's ``ControllerPolicy`` replaced by two: served as A and as B."""
    from .evaluate import ControllerPolicy
    from .guard import DEFAULT_QUANTILE

    expanded = []
    for policy in policies:
        controller = getattr(policy, "controller", None)
        if isinstance(policy, ControllerPolicy) and controller.config.hybrid:
            quantile = policy.guard.quantile if policy.guard is not None else DEFAULT_QUANTILE
            expanded += [
                ControllerPolicy(controller.served_as(mode), policy.vlm, table=policy.table, quantile=quantile)
                for mode in ("A", "B")
            ]
        else:
            expanded.append(policy)
    return expanded


# --- serving the vision-aware Mode B --------------------------------------------------------
def vision_decide(policy, vlm, question: str, budget_ms: float, price: float, image: torch.Tensor):
    """A vision-aware Mode-B controller's greedy decision for one request: (tier, p, top_k, blocks) indices.

    ``policy``: its ``ControllerPolicy``. Stage 1 from the question and the budget, then the
    vision statistics at the chosen tier (the vision tower on that tier's crops), then
    Stage 2. Called inside ``reuse_image_features``, the generate that follows reuses the
    vision features.
    """
    from .vision_features import vision_statistics

    decider = policy.decider
    space = policy.controller.knob_space
    with torch.inference_mode():
        fitting = decider.fitting(budget_ms)
        shared = decider.features(question, budget_ms, price)
        tier, position = decider.stage1(shared, fitting)
    vision = vision_statistics(vlm, [image], [space.tiers[tier]])
    with torch.inference_mode():
        return (tier, position, *decider.stage2(tier, position, fitting, shared, vision_feat=vision))


def serve_vision_one(policy, vlm, image, question: str, budget_ms: float, answer_tokens: int, price: float = 0.0):
    """``ControllerPolicy.serve_one`` for a vision-aware Mode-B controller: (answer, knobs).

    The decision (Stage 1, the vision statistics at the chosen tier, Stage 2) is timed into
    ``policy.last_decision_ms``; with ``policy.reuse_vision`` (default True) the generate
    reuses the vision features the statistics were computed from, else it runs the vision
    tower again.
    """
    from .vision_features import reuse_image_features

    with reuse_image_features(vlm) if getattr(policy, "reuse_vision", True) else nullcontext():
        start = time.perf_counter()
        choice = vision_decide(policy, vlm, question, budget_ms, price, image)
        policy.last_decision_ms = (time.perf_counter() - start) * 1000.0
        knobs = policy.decider.knobs(*choice)
        return vlm.generate([image], [question], knobs, answer_tokens).answers[0], knobs


# --- timing ------------------------------------------------------------------------------
def training_config(controller: TwoStageController, steps: int = 1):
    """The ``GRPOConfig`` of one step of the shipped recipe for this controller (for timing)."""
    from .grpo import GRPOConfig

    config = controller.config
    kind = controller_kind(controller)
    priced = config.max_price > 0
    options = dict(
        steps=steps, val_every=0, max_price=config.max_price, use_question=config.use_question,
        average_fraction=RECIPE["average_fraction"] if priced else 0.0,
    )
    if kind == "Mode A":
        return GRPOConfig(mode="A-resumable", **options)
    options["kl_coef"] = RECIPE["kl_coef"]
    if kind.startswith("hybrid"):
        return GRPOConfig(mode="B", hybrid=True, distill_coef=DISTILL_COEF["hybrid"], **options)
    if getattr(config, "distilled_from", ""):
        return GRPOConfig(
            mode="B", distill_from=config.distilled_from, distill_coef=DISTILL_COEF["distilled"],
            vision_stats=config.vision_stats, **options,
        )
    return GRPOConfig(mode="B", vision_stats=config.vision_stats, **options)


def training_step_times(vlm, table, controllers: dict, steps: int = 10, warmup: int = 2, progress: bool = True) -> dict:
    """Seconds per GRPO step (batch 8 x G 5) of each controller's training, interleaved in rounds.

    One trainer per entry, each with a copy of its controller (the controllers are not
    changed) and the shipped recipe's settings (``training_config``); a hybrid is timed once
    (both views train the same way). Each round runs one step of every trainer, the order
    rotating, so the machine's drift costs each alike. Returns name -> {"median_s", "steps_s"}.
    """
    from tqdm.auto import tqdm

    from .training import make_trainer

    trainers, trained_as = {}, {}
    for name, controller in controllers.items():
        # Both views of a hybrid train as one: the whole hybrid.
        source = getattr(controller, "hybrid_source", controller)
        first = next((other for other, s in trained_as.items() if s is source), None)
        trained_as[name] = source
        if first is not None:
            continue
        cfg = training_config(source, steps=warmup + steps)
        if cfg.distill_from and not Path(cfg.distill_from).is_dir():
            cfg.distill_from = str(data_path("controller_A"))  # the teacher's folder as shipped
        trainers[name] = make_trainer(vlm, table, cfg, train_size=400, controller=copy.deepcopy(source))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for r in tqdm(range(warmup + steps), desc="training steps", disable=not progress):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            trainers[name].train_step()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    result = {name: {"median_s": statistics.median(t), "steps_s": t} for name, t in times.items()}
    for name, source in trained_as.items():
        if name not in result:
            result[name] = result[next(other for other in trainers if trained_as[other] is source)]
    return result


def serving_overheads(
    vlm, table, controllers: dict, samples, budget_ms: float, warmup: int = 3, repeats: int = 3, progress: bool = True
) -> dict:
    """Per controller, what serving one request at batch 1 costs beyond the VLM's own work.

    For each request (interleaved across controllers, in turn), ``repeats`` times each and
    alternating: the wall clock of ``ControllerPolicy.serve_one`` and of a plain
    ``generate`` of the configuration it chose. The fastest of the repeats is kept on each
    side (the least disturbed by other processes on a shared machine), and the overhead is
    their difference (decision, vision statistics, probe and pause). The vision-aware Mode B
    is served twice: reusing the vision features in the generate, and computing them twice.
    Returns name -> {"median_overhead_ms", "median_decision_ms", "median_served_ms",
    "median_plain_ms", "requests"}; medians over the recorded requests.
    """
    from tqdm.auto import tqdm

    from .evaluate import ControllerPolicy

    answer_tokens = table.answer_tokens
    policies = {}
    for name, controller in controllers.items():
        policies[name] = ControllerPolicy(controller, vlm, table=table)
        if getattr(controller.config, "vision_stats", False):
            twice = ControllerPolicy(controller, vlm, table=table)
            twice.reuse_vision = False
            policies[f"{name} [vision features computed twice]"] = twice
    images = [s.image() for s in samples]
    records: dict[str, list[tuple[float, float, float]]] = {name: [] for name in policies}
    names = list(policies)
    for i, (sample, image) in enumerate(tqdm(list(zip(samples, images)), desc="serving", disable=not progress)):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            policy = policies[name]
            served, plain, decision = [], [], []
            for _ in range(repeats):
                policy.last_decision_ms = 0.0
                start = time.perf_counter()
                _, knobs = policy.serve_one(vlm, image, sample.question, budget_ms, answer_tokens)
                served.append(time.perf_counter() - start)
                decision.append(getattr(policy, "last_decision_ms", 0.0))
                start = time.perf_counter()
                vlm.generate([image], [sample.question], knobs, answer_tokens)
                plain.append(time.perf_counter() - start)
            if i >= warmup:
                records[name].append((min(served) * 1000.0, min(plain) * 1000.0, min(decision)))
    result = {}
    for name, rows in records.items():
        result[name] = {
            "median_overhead_ms": statistics.median(s - p for s, p, _ in rows),
            "median_decision_ms": statistics.median(d for _, _, d in rows),
            "median_served_ms": statistics.median(s for s, _, _ in rows),
            "median_plain_ms": statistics.median(p for _, p, _ in rows),
            "requests": len(rows),
        }
    return result


# --- the table ---------------------------------------------------------------------------
def variants_table(plane: dict, step_times: dict, overheads: dict, names) -> list[dict]:
    """One row per controller: accuracy per budget, their mean, mean latency and violation rate
    (per-request budgets on the plane), training seconds per step and its ratio to Mode B's,
    serving overhead per request (ms)."""
    points = [p for p in plane["points"] if p["kind"] == "budget"]
    rows = []
    for name in names:
        mine = sorted((p for p in points if p["policy"] == name), key=lambda p: p["x"])
        if not mine:
            continue
        targets = [p for p in plane["points"] if p["kind"] == "target" and p["policy"] == name]
        row = {
            "policy": name,
            "budgets_ms": [p["x"] for p in mine],
            "accuracy": [p["accuracy"] for p in mine],
            "mean_accuracy": statistics.mean(p["accuracy"] for p in mine),
            "mean_latency_ms": statistics.mean(p["mean_latency_ms"] for p in mine),
            "violation_rate": statistics.mean(p["violation_rate"] for p in mine),
            "target_mean_accuracy": statistics.mean(p["accuracy"] for p in targets) if targets else None,
            "step_time_s": step_times.get(name, {}).get("median_s"),
            "serving_overhead_ms": overheads.get(name, {}).get("median_overhead_ms"),
            "decision_ms": overheads.get(name, {}).get("median_decision_ms"),
        }
        twice = overheads.get(f"{name} [vision features computed twice]")
        if twice is not None:
            row["serving_overhead_ms_vision_computed_twice"] = twice["median_overhead_ms"]
        rows.append(row)
    by = {r["policy"]: r for r in rows}
    base_a, base_b = by.get("controller (Mode A)"), by.get("controller (Mode B)")
    for row in rows:
        if base_b is not None and base_b["step_time_s"] and row["step_time_s"]:
            row["step_time_over_mode_b"] = row["step_time_s"] / base_b["step_time_s"]
        if base_a is not None:
            row["accuracy_minus_mode_a"] = row["mean_accuracy"] - base_a["mean_accuracy"]
        if base_a is not None and base_b is not None and row.get("step_time_over_mode_b") is not None:
            row["reaches_mode_a_at_mode_b_cost"] = bool(
                row["accuracy_minus_mode_a"] >= -ACCURACY_SLACK and row["step_time_over_mode_b"] <= COST_FACTOR
            )
    return rows


def format_variants(rows: list[dict]) -> str:
    """The table as plain text: accuracy per budget, then the summary columns."""
    if not rows:
        return "(no controllers)"
    budgets = rows[0]["budgets_ms"]
    head = f"{'policy':>34} | " + " ".join(f"{b:6.1f}" for b in budgets) + " |  mean | lat ms | viol. | s/step | x B  | serve ms"
    lines = [head, "-" * len(head)]
    for r in rows:
        step = f"{r['step_time_s']:6.3f}" if r.get("step_time_s") else "     -"
        ratio = f"{r['step_time_over_mode_b']:4.2f}" if r.get("step_time_over_mode_b") else "   -"
        serve = f"{r['serving_overhead_ms']:8.2f}" if r.get("serving_overhead_ms") is not None else "       -"
        lines.append(
            f"{r['policy'][:34]:>34} | " + " ".join(f"{a:6.3f}" for a in r["accuracy"])
            + f" | {r['mean_accuracy']:.3f} | {r['mean_latency_ms']:6.2f} | {r['violation_rate']:.3f} | {step} | {ratio} | {serve}"
        )
    lines.append("(accuracy on test per per-request budget ms; mean over the sweep; mean latency and violation rate over the "
                 "sweep; training s per GRPO step and its ratio to Mode B's; serving overhead per request at batch 1)")
    for r in rows:
        if "serving_overhead_ms_vision_computed_twice" in r:
            lines.append(
                f"{r['policy']}: serving overhead {r['serving_overhead_ms']:.2f} ms with the vision features reused by the "
                f"generate, {r['serving_overhead_ms_vision_computed_twice']:.2f} ms computed twice"
            )
    return "\n".join(lines)


def evaluate_variants(
    vlm, table, controllers: dict, val, test, val_samples, test_samples, budgets, targets, quantile,
    timing_steps: int = 10, serving_requests: int = 40, progress: bool = True,
) -> dict:
    """The plane (``knoblib.plane.evaluate_plane``) of every controller, their training step
    times and serving overheads, and the table (``variants_table``)."""
    from .plane import evaluate_plane

    plane = evaluate_plane(vlm, controllers, table, val, test, val_samples, test_samples, budgets, targets, quantile, progress)
    step_times = training_step_times(vlm, table, controllers, steps=timing_steps, progress=progress) if timing_steps else {}
    middle = 0.5 * (budgets[0] + budgets[-1])
    overheads = (
        serving_overheads(vlm, table, controllers, test_samples[:serving_requests], middle, progress=progress)
        if serving_requests else {}
    )
    rows = variants_table(plane, step_times, overheads, list(controllers))
    return {"rows": rows, "plane": plane, "step_times": step_times, "serving": overheads, "serving_budget_ms": middle}


def variants_command(args) -> None:
    """``python -m knoblib evaluate --variants``: every controller variant in one run -> ``variants.json``."""
    from .assets import load_assets, load_samples
    from .correctness import Correctness
    from .guard import DEFAULT_QUANTILE
    from .latency import machine_info
    from .outputs import check_output

    out = Path(args.out)
    target = check_output(out / "variants.json", args.overwrite, "--out")  # before any work
    vlm, table = load_assets(args.model, args.table)
    quantile = getattr(args, "quantile", DEFAULT_QUANTILE)
    sources: dict = {}
    controllers = load_controllers(args.controllers, vlm.knob_space, sources)
    val = Correctness.load(data_path("correctness_val.safetensors"))
    test = Correctness.load(data_path(f"correctness_{args.split}.safetensors"))
    by_uid = {s.uid: s for s in load_samples("val")}
    val_samples = [by_uid[u] for u in val.uids][: getattr(args, "val_n", None) or 400]
    by_uid = {s.uid: s for s in load_samples(args.split)}
    test_samples = [by_uid[u] for u in test.uids][: args.n or len(test.uids)]
    fastest = table.latency(table.fastest(), quantile)
    full = table.latency(vlm.knob_space.full(), quantile)
    budgets = torch.linspace(fastest, full, args.budgets, dtype=torch.float64).tolist()
    targets = torch.linspace(table.min_ms, table.reference_ms, args.budgets, dtype=torch.float64).tolist()
    start = time.perf_counter()
    result = evaluate_variants(
        vlm, table, controllers, val, test, val_samples, test_samples, budgets, targets, quantile,
        timing_steps=args.timing_steps, serving_requests=args.serving_requests,
    )
    print(format_variants(result["rows"]))
    payload = {
        "split": args.split, "n": len(test_samples), "val_n": len(val_samples), "quantile": quantile,
        "reference_ms": table.reference_ms, "timing_steps": args.timing_steps, "serving_requests": args.serving_requests,
        "accuracy_slack": ACCURACY_SLACK, "cost_factor": COST_FACTOR,
        "machine": {**{k: machine_info().get(k) for k in ("cpu_model", "cpu_count", "torch", "torch_num_threads")},
                    "load_avg": round(__import__("os").getloadavg()[0], 2)},
        "seconds": time.perf_counter() - start,
        "controllers": {name: {"folder": _shown(path), "weights_sha256": fingerprint(path)} for name, path in sources.items()},
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(target.name + ".tmp")
    staged.write_text(json.dumps(payload, indent=1, default=_plain) + "\n")
    staged.replace(target)
    print(f"saved {target}")


def _shown(path: Path) -> str:
    """A folder as the repository names it (data/controller_A), else as given."""
    try:
        return str(Path(path).resolve().relative_to(data_path().parent.resolve()))
    except ValueError:
        return str(path)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
