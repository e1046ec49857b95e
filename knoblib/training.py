"""The ``train`` and ``evaluate`` commands: wiring of the VLM, latency table, controller and trainer."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .controller import ControllerConfig, TwoStageController
from .data import data_path, load_split, split_path
from .grpo import WARM_START_TEACHERS, GRPOConfig, JointGRPOTrainer, check_resume_config, checkpoint_config
from .latency import BudgetSampler, LatencyTable
from .outputs import check_output, replace_dir, runs_path, staging_dir
from .vlm import KnobVLM

# What ``train --export`` writes; a folder holding only these, with a controller config,
# is an earlier export and may be replaced (with --overwrite).
EXPORT_FILES = ("config.json", "model.safetensors", "metrics.jsonl")
# The files and folders of a run folder that a fresh run (--overwrite) replaces.
RUN_ENTRIES = ("metrics.jsonl", "best", "last")


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


def check_export(path: str | Path, overwrite: bool) -> Path:
    """Refuse an ``--export`` folder that holds anything but an earlier controller export.

    An earlier export (only ``EXPORT_FILES``, with a ``config.json`` whose ``model_type``
    is the controller's) may be replaced with ``overwrite``; any other non-empty folder is
    refused whatever ``overwrite`` says, and nothing in it is touched.
    """
    path = Path(path)
    if data_path().resolve().is_relative_to(path.resolve()):
        return check_output(path, overwrite, "--export", kind="dir")  # raises: data/ itself is never replaced
    if path.is_dir() and any(path.iterdir()):
        entries = sorted(p.name for p in path.iterdir())
        foreign = [name for name in entries if name not in EXPORT_FILES or (path / name).is_dir()]
        if foreign:
            raise ValueError(
                f"--export {path} holds {foreign}, which an export does not write (it writes {list(EXPORT_FILES)}): "
                "choose an empty or new folder"
            )
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != ControllerConfig.model_type:
            raise ValueError(
                f"--export {path} is not an earlier controller export (its config.json has model_type "
                f"{model_type!r}, expected {ControllerConfig.model_type!r}): choose an empty or new folder"
            )
    return check_output(path, overwrite, "--export", kind="dir")


def export_controller(run_dir: Path, export: Path, overwrite: bool) -> None:
    """Write the run's best controller and its metrics to ``export``: built next to it, then swapped in."""
    check_export(export, overwrite)  # again: the folder may have changed during the run
    best = TwoStageController.load(run_dir / "best")
    staged = staging_dir(export)
    try:
        best.save_pretrained(staged)
        shutil.copy(run_dir / "metrics.jsonl", staged / "metrics.jsonl")
        replace_dir(staged, export)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def resume_config(args, saved: GRPOConfig) -> GRPOConfig:
    """The config a resumed run asks for: the checkpoint's, with the values given on the command line."""
    cfg = replace(saved)
    for name in TRAIN_OPTIONS:
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.__post_init__()
    return cfg


# The command-line options that set a GRPOConfig field of the same name.
TRAIN_OPTIONS = (
    "steps", "seed", "lr", "entropy_coef", "scale_rewards", "kl_coef", "warm_start_steps", "warm_start_entropy", "warm_start_teacher",
)


def train_controller_command(args) -> None:
    out = Path(args.out or runs_path(args.mode))
    # Every output is checked before the model loads and training starts.
    if (out / "metrics.jsonl").exists() and not (args.resume or args.overwrite):
        raise FileExistsError(
            f"{out} already holds a run: pass --resume to continue it, --overwrite to start it again, or choose another --out"
        )
    check_output(out, args.overwrite, "--out", kind="dir", existing_ok=args.resume)
    if args.override and not args.resume:
        raise ValueError("--override only applies with --resume (it overrides the checkpoint's settings)")
    if args.export:
        check_export(args.export, args.overwrite)
    if args.resume:
        saved = checkpoint_config(out / "last")
        if saved.mode != args.mode:
            raise ValueError(f"checkpoint at {out / 'last'} was trained in mode {saved.mode!r}, --mode is {args.mode!r}")
        cfg = resume_config(args, saved)
        # Checked here too (load_checkpoint checks again), so a refusal comes before the model loads.
        check_resume_config(asdict(saved), cfg, args.override, out / "last")
    else:
        cfg = GRPOConfig(mode=args.mode)
        for name in TRAIN_OPTIONS:
            if getattr(args, name, None) is not None:
                setattr(cfg, name, getattr(args, name))
        cfg.__post_init__()
    vlm, table = load_assets(args.model)
    trainer = make_trainer(vlm, table, cfg)
    if args.resume:
        trainer.load_checkpoint(out / "last", override=args.override)
        print(f"resumed from {out / 'last'} at step {trainer.step_count}")
    else:
        if args.overwrite:
            # A fresh run replaces the old run's log and checkpoints (other files stay).
            for name in RUN_ENTRIES:
                entry = out / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.exists():
                    entry.unlink()
        if cfg.warm_start_steps:
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
        export_controller(out, Path(args.export), args.overwrite)
        print(f"exported the best controller to {args.export}")


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

    check_output(args.out, args.overwrite, "--out", kind="dir")
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
