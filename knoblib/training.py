"""The ``train`` and ``evaluate`` commands: wiring of the VLM, latency table, controller and trainer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from .controller import ControllerConfig, TwoStageController
from .data import data_path, load_split, split_path
from .grpo import WARM_START_TEACHERS, GRPOConfig, JointGRPOTrainer
from .guard import DEFAULT_QUANTILE
from .assets import load_assets  # noqa: F401  (re-exported: notebooks import it from here)
from .latency import BudgetSampler, LatencyTable
from .vlm import KnobVLM


def make_trainer(
    vlm: KnobVLM,
    table: LatencyTable,
    cfg: GRPOConfig,
    train_size: int | None = None,
    controller: TwoStageController | None = None,
    device: str | torch.device | None = None,
) -> JointGRPOTrainer:
    """A trainer over the shipped splits with a fresh controller (seeded) unless one is given.

    ``device`` (e.g. ``"cuda"``) moves the VLM and the controller there first; by default
    both stay where they are.
    """
    train = load_split(split_path(data_path("vqa"), "train"))[:train_size]
    val = load_split(split_path(data_path("vqa"), "val"))
    if controller is None:
        # The controller learns relative budgets: the training range as fractions of this
        # machine's full-configuration latency, so it serves on any machine.
        sampler = BudgetSampler(table, margin=cfg.budget_margin)
        config = ControllerConfig.for_vlm(
            vlm, sampler.relative_range, mode=cfg.stage2_mode, seed=cfg.seed, budget_guard=cfg.budget_guard
        )
        controller = TwoStageController(config)
    if device is not None:
        vlm.to(device)
        controller.to(device)
    return JointGRPOTrainer(vlm, controller, table, train, val, cfg)


def warm_start_teacher(
    name: str, table: LatencyTable, accuracy_path: str | Path | None = None, quantile: float = DEFAULT_QUANTILE
):
    """``teacher(sample, budget_ms) -> KnobConfig`` for ``JointGRPOTrainer.warm_start``.

    ``table``: the static lookup table; ``family-table``: the most accurate configuration
    for the sample's family. Both from ``data/config_accuracy_val.json`` (validation).
    """
    from .evaluate import FamilyTablePolicy, LookupTablePolicy, load_config_accuracy

    accuracy = load_config_accuracy(accuracy_path or data_path("config_accuracy_val.json"))
    if name == "table":
        lookup = LookupTablePolicy(table, accuracy, quantile)
        return lambda sample, budget: lookup.choose_one(budget)
    if name == "family-table":
        per_family = FamilyTablePolicy(table, accuracy, quantile)
        return lambda sample, budget: per_family.choose_one(sample.family, budget)
    raise ValueError(f"warm start teacher {name!r} is invalid: allowed {list(WARM_START_TEACHERS)}")


def train_controller_command(args) -> None:
    vlm, table = load_assets(args.model)
    cfg = GRPOConfig(mode=args.mode, seed=args.seed)
    for name in ("steps", "lr", "entropy_coef", "scale_rewards", "kl_coef", "warm_start_steps", "warm_start_entropy", "warm_start_teacher"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.__post_init__()
    out = Path(args.out or Path("runs") / args.mode)
    trainer = make_trainer(vlm, table, cfg)
    if args.resume:
        trainer.load_checkpoint(out / "last")
        print(f"resumed from {out / 'last'} at step {trainer.step_count}")
    elif (out / "metrics.jsonl").exists():
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    elif cfg.warm_start_steps:
        losses = trainer.warm_start(
            warm_start_teacher(cfg.warm_start_teacher, table, quantile=cfg.guard_quantile),
            cfg.warm_start_steps,
            entropy_coef=cfg.warm_start_entropy,
        )
        print(
            f"warm start: {cfg.warm_start_steps} behaviour-cloning steps on the {cfg.warm_start_teacher} teacher, "
            f"nll {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    trainer.train(out)
    last = trainer.history[-1]
    print(
        f"done: {trainer.step_count} steps, last val reward {last.get('val_reward', float('nan')):.3f}, "
        f"mean step time {sum(h['step_time_s'] for h in trainer.history) / len(trainer.history):.2f} s"
    )
    if args.export:
        export = Path(args.export)
        best = TwoStageController.load(out / "best")
        tmp = export.with_name(export.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        best.save_pretrained(tmp)
        shutil.copy(out / "metrics.jsonl", tmp / "metrics.jsonl")
        shutil.rmtree(export, ignore_errors=True)
        tmp.replace(export)
        print(f"exported the best controller to {export}")


def evaluate_command(args) -> None:
    """``python -m knoblib evaluate``: the budget sweep on this machine's latency table, and with
    ``--measured`` every request served one at a time and timed by the wall clock."""
    from .assets import load_samples
    from .evaluate import (
        ControllerPolicy,
        FullModelPolicy,
        LookupTablePolicy,
        RandomFeasiblePolicy,
        budget_sweep,
        format_measured,
        format_sweep,
        load_config_accuracy,
        measured_sweep,
    )
    from .plots import plot_sweep

    vlm, table = load_assets(args.model, args.table)
    quantile = getattr(args, "quantile", DEFAULT_QUANTILE)
    policies = [
        ControllerPolicy(TwoStageController.load(path, expected_space=vlm.knob_space), vlm, table=table, quantile=quantile)
        for path in args.controllers
    ]
    policies += [
        LookupTablePolicy(table, load_config_accuracy(data_path("config_accuracy_val.json")), quantile),
        RandomFeasiblePolicy(table, seed=0, quantile=quantile),
        FullModelPolicy(vlm.knob_space),
    ]
    # The sweep spans this machine's achievable range: from the fastest configuration to the
    # full one, both at the guard's quantile (a budget above the full configuration's latency
    # is served by it and decides nothing).
    fastest = table.latency(table.fastest(), quantile)
    full = table.latency(vlm.knob_space.full(), quantile)
    budgets = torch.linspace(fastest, full, args.budgets, dtype=torch.float64).tolist()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.measured:
        samples = load_samples(args.split)
        samples = random.Random(args.seed).sample(samples, min(args.n or 200, len(samples)))
        rows = measured_sweep(vlm, policies, samples, table, budgets, seed=args.seed)
        print(format_measured(rows))
        payload = {
            "split": args.split, "n": len(samples), "seed": args.seed, "quantile": quantile,
            "answer_tokens": table.answer_tokens, "reference_ms": table.reference_ms,
            "machine": {k: table.machine.get(k) for k in ("cpu_model", "cpu_count", "torch", "torch_num_threads")},
            "rows": [r.as_dict() for r in rows],
        }
        (out / "measured.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"saved {out / 'measured.json'}")
        return
    samples = load_samples(args.split, args.n or 1000)
    rows = budget_sweep(vlm, policies, samples, table, budgets)
    print(format_sweep(rows))
    (out / "sweep.json").write_text(json.dumps({"split": args.split, "n": len(samples), "quantile": quantile, "rows": [r.as_dict() for r in rows]}, indent=1))
    fig = plot_sweep(rows)
    fig.savefig(out / "sweep.png", dpi=120, bbox_inches="tight")
    print(f"saved {out / 'sweep.json'} and {out / 'sweep.png'}")
