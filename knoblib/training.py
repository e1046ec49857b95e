"""The ``train`` and ``evaluate`` commands: wiring of the VLM, latency table, controller and trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .controller import ControllerConfig, TwoStageController
from .data import data_path, load_split, split_path
from .grpo import WARM_START_TEACHERS, GRPOConfig, JointGRPOTrainer
from .latency import BudgetSampler, LatencyTable
from .vlm import KnobVLM


def load_assets(model_dir: str | Path | None = None, table_path: str | Path | None = None):
    """The shipped VLM and its latency table (checked to belong together)."""
    vlm = KnobVLM.from_pretrained(model_dir or data_path("model"))
    table = LatencyTable.load(table_path or data_path("latency_table.json"))
    table.check_space(vlm.knob_space)
    return vlm, table


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
        sampler = BudgetSampler(table, margin=cfg.budget_margin)
        config = ControllerConfig.for_vlm(
            vlm, (sampler.low, sampler.high), mode=cfg.stage2_mode, seed=cfg.seed, budget_guard=cfg.budget_guard
        )
        controller = TwoStageController(config)
    if device is not None:
        vlm.to(device)
        controller.to(device)
    return JointGRPOTrainer(vlm, controller, table, train, val, cfg)


def warm_start_teacher(name: str, table: LatencyTable, accuracy_path: str | Path | None = None):
    """``teacher(sample, budget_ms) -> KnobConfig`` for ``JointGRPOTrainer.warm_start``.

    ``table``: the static lookup table; ``family-table``: the most accurate configuration
    for the sample's family. Both from ``data/config_accuracy_val.json`` (validation).
    """
    from .evaluate import FamilyTablePolicy, LookupTablePolicy, load_config_accuracy

    accuracy = load_config_accuracy(accuracy_path or data_path("config_accuracy_val.json"))
    if name == "table":
        lookup = LookupTablePolicy(table, accuracy)
        return lambda sample, budget: lookup.choose_one(budget)
    if name == "family-table":
        per_family = FamilyTablePolicy(table, accuracy)
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
            warm_start_teacher(cfg.warm_start_teacher, table), cfg.warm_start_steps, entropy_coef=cfg.warm_start_entropy
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
    from .evaluate import (
        ControllerPolicy,
        FullModelPolicy,
        LookupTablePolicy,
        RandomFeasiblePolicy,
        budget_sweep,
        format_sweep,
        load_config_accuracy,
    )
    from .plots import plot_sweep

    vlm, table = load_assets(args.model)
    samples = load_split(split_path(data_path("vqa"), args.split))[: args.n]
    policies = [
        ControllerPolicy(TwoStageController.load(path, expected_space=vlm.knob_space), vlm, table=table)
        for path in args.controllers
    ]
    policies += [
        LookupTablePolicy(table, load_config_accuracy(data_path("config_accuracy_val.json"))),
        RandomFeasiblePolicy(table, seed=0),
        FullModelPolicy(),
    ]
    budgets = BudgetSampler(table).sweep(args.budgets).tolist()
    rows = budget_sweep(vlm, policies, samples, table, budgets)
    print(format_sweep(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"split": args.split, "n": len(samples), "rows": [r.as_dict() for r in rows]}, indent=1))
    fig = plot_sweep(rows)
    fig.savefig(out / "sweep.png", dpi=120, bbox_inches="tight")
    print(f"saved {out / 'sweep.json'} and {out / 'sweep.png'}")
