"""The ``train`` and ``evaluate`` commands: wiring of the VLM, latency table, controller and trainer."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .controller import ControllerConfig, TwoStageController
from .assets import load_assets, load_samples  # noqa: F401  (load_assets re-exported: notebooks import it from here)
from .data import data_path
from .grpo import WARM_START_TEACHERS, GRPOConfig, JointGRPOTrainer, check_resume_config, checkpoint_config
from .guard import DEFAULT_QUANTILE
from .latency import BudgetSampler, LatencyTable
from .outputs import check_output, replace_dir, runs_path, staging_dir
from .vlm import KnobVLM

# What ``train --export`` writes; a folder holding only these, with a controller config,
# is an earlier export and may be replaced (with --overwrite).
EXPORT_FILES = ("config.json", "model.safetensors", "metrics.jsonl")
# The files and folders of a run folder that a fresh run (--overwrite) replaces.
RUN_ENTRIES = ("metrics.jsonl", "best", "last")


def make_trainer(
    vlm: KnobVLM,
    table: LatencyTable,
    cfg: GRPOConfig,
    train_size: int | None = None,
    controller: TwoStageController | None = None,
    device: str | torch.device | None = None,
    train_uids: set[str] | None = None,
) -> JointGRPOTrainer:
    """A trainer over the shipped splits with a fresh controller (seeded) unless one is given.

    ``device`` (e.g. ``"cuda"``) moves the VLM and the controller there first; by default
    both stay where they are. ``train_uids`` keeps only those training questions (the ones
    a correctness table covers).
    """
    train = load_samples("train", train_size)
    if train_uids is not None:
        train = [s for s in train if s.uid in train_uids]
    val = load_samples("val")
    if controller is None:
        # The controller learns relative budgets: the training range as fractions of this
        # machine's full-configuration latency, so it serves on any machine.
        sampler = BudgetSampler(table, margin=cfg.budget_margin)
        config = ControllerConfig.for_vlm(
            vlm, sampler.relative_range, mode=cfg.stage2_mode, seed=cfg.seed, budget_guard=cfg.budget_guard,
            max_price=cfg.max_price, use_question=cfg.use_question, vision_stats=cfg.vision_stats, hybrid=cfg.hybrid,
            distilled_from=cfg.distill_from if (cfg.distill_steps or cfg.distill_coef) else "",
        )
        controller = TwoStageController(config)
    if device is not None:
        vlm.to(device)
        controller.to(device)
    teacher = None
    if cfg.distill_from and (cfg.distill_steps or cfg.distill_coef):
        # The Mode-A teacher a Mode-B student is distilled from (knoblib.distill).
        teacher = TwoStageController.load(
            cfg.distill_from, expected_space=vlm.knob_space, expected_mode="A", expected_latency_dim=vlm.hidden_size
        ).to(controller.device)
    return JointGRPOTrainer(vlm, controller, table, train, val, cfg, teacher=teacher)


def warm_start_teacher(
    name: str, table: LatencyTable, accuracy_path: str | Path | None = None, quantile: float = DEFAULT_QUANTILE
):
    """``teacher(sample, budget_ms) -> KnobConfig`` for ``JointGRPOTrainer.warm_start``.

    ``table``: the static lookup table; ``family-table``: the most accurate configuration
    for the sample's family. Both from ``data/config_accuracy_val.json`` (validation).
    (``oracle`` is ``oracle_teacher``; ``correctness`` is not a teacher to clone but
    ``JointGRPOTrainer.fit_to_correctness``.)
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


def oracle_teacher(correctness, table: LatencyTable, quantile: float = DEFAULT_QUANTILE):
    """``teacher(sample, budget_ms) -> KnobConfig``: the cheapest configuration that answers the
    sample right among those that fit the budget (at ``quantile``); the cheapest fitting one if
    none does. From the per-sample correctness of the training questions (``correctness``)."""
    configs = sorted(correctness.configs, key=table.latency)
    columns = [correctness.column(k) for k in configs]
    fastest = table.latency(table.fastest(), quantile)

    def teacher(sample, budget_ms):
        row = correctness.correct[correctness.row(sample.uid)]
        fitting = [(k, c) for k, c in zip(configs, columns) if table.latency(k, quantile) <= max(budget_ms, fastest)]
        return next((k for k, c in fitting if bool(row[c])), fitting[0][0])

    return teacher


def with_options(cfg: GRPOConfig, args) -> GRPOConfig:
    """``cfg`` with the values given on the command line (``TRAIN_OPTIONS``, ``--saving-bonus``)."""
    cfg = replace(cfg)
    for name in TRAIN_OPTIONS:
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    if getattr(args, "saving_bonus", None) is not None:
        cfg.reward = replace(cfg.reward, saving_bonus=args.saving_bonus)
    cfg.__post_init__()
    return cfg


def resume_config(args, saved: GRPOConfig) -> GRPOConfig:
    """The config a resumed run asks for: the checkpoint's, with the values given on the command line."""
    return with_options(saved, args)


# The command-line options that set a GRPOConfig field of the same name.
TRAIN_OPTIONS = (
    "steps", "seed", "lr", "entropy_coef", "scale_rewards", "kl_coef", "warm_start_steps", "warm_start_entropy", "warm_start_teacher",
    "average_fraction", "max_price", "use_question",
    "vision_stats", "hybrid", "hybrid_grpo_coef", "distill_from", "distill_steps", "distill_coef",
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
        cfg = with_options(GRPOConfig(mode=args.mode), args)
    correctness = None
    if cfg.warm_start_steps and cfg.warm_start_teacher in ("correctness", "critic", "oracle"):
        from .correctness import Correctness

        correctness = Correctness.load(args.correctness or data_path("correctness_train.safetensors"))
    vlm, table = load_assets(args.model)
    # A correctness-based warm start trains on the questions the table covers.
    trainer = make_trainer(vlm, table, cfg, train_uids=set(correctness.uids) if correctness is not None else None)
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
        if cfg.warm_start_steps and cfg.warm_start_teacher in ("correctness", "critic"):
            critic = cfg.warm_start_teacher == "critic"
            losses = trainer.fit_to_correctness(
                correctness, cfg.warm_start_steps, entropy_coef=cfg.warm_start_entropy, critic=critic
            )
            print(
                f"warm start: {cfg.warm_start_steps} steps fitting "
                + ("the critic's best configuration" if critic else "the expected reward of every configuration")
                + f" on {len(correctness)} training questions, reward {-losses[0]:.3f} -> {-losses[-1]:.3f}"
            )
        elif cfg.warm_start_steps:
            teacher = (
                oracle_teacher(correctness, table, cfg.guard_quantile)
                if cfg.warm_start_teacher == "oracle"
                else warm_start_teacher(cfg.warm_start_teacher, table, quantile=cfg.guard_quantile)
            )
            losses = trainer.warm_start(teacher, cfg.warm_start_steps, entropy_coef=cfg.warm_start_entropy)
            print(
                f"warm start: {cfg.warm_start_steps} behaviour-cloning steps on the {cfg.warm_start_teacher} teacher, "
                f"nll {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
        if cfg.distill_steps:
            import time

            from .distill import distill

            start = time.perf_counter()
            kl = distill(trainer, cfg.distill_steps)
            who = "the B head into the A head" if cfg.hybrid else f"the Mode-A teacher {cfg.distill_from}"
            print(
                f"distillation: {cfg.distill_steps} steps of {who}, KL {kl[0]:.3f} -> {kl[-1]:.3f} "
                f"({time.perf_counter() - start:.0f} s)"
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
    """``python -m knoblib evaluate``: every policy on the accuracy / mean-latency plane (per-request
    budgets and target mean latencies, choices on val, scores on test, this machine's table), and
    with ``--measured`` every request served one at a time and timed by the wall clock."""
    from .evaluate import (
        ControllerPolicy,
        FullModelPolicy,
        LookupTablePolicy,
        RandomFeasiblePolicy,
        format_measured,
        load_config_accuracy,
        measured_sweep,
    )
    from .plane import format_plane

    check_output(args.out, args.overwrite, "--out", kind="dir")
    vlm, table = load_assets(args.model, args.table)
    quantile = getattr(args, "quantile", DEFAULT_QUANTILE)
    paths = args.controllers
    if paths is None:
        # The shipped controllers and their other training seeds (controller_B_seed1, ...).
        paths = sorted(p for p in data_path().glob("controller_*") if (p / "config.json").is_file())
    policies = [
        ControllerPolicy(TwoStageController.load(path, expected_space=vlm.knob_space), vlm, table=table, quantile=quantile)
        for path in paths
    ]
    # A hybrid controller (knoblib.variants) is served both ways: as A and as B.
    from .variants import expand_hybrids

    policies = expand_hybrids(policies)
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
        # One controller per kind is served (the first folder of each; other seeds are for the plane).
        served = list({policy.name: policy for policy in reversed(policies)}.values())[::-1]
        if args.controllers is None:
            # The shipped kinds (Mode A, Mode B, the budget-only ablation); the variants' serving
            # is timed by `evaluate --variants`, and serving them here too would double the run.
            from .variants import is_variant

            served = [p for p in served if not (isinstance(p, ControllerPolicy) and is_variant(p.controller))]
        rows = measured_sweep(vlm, served, samples, table, budgets, seed=args.seed)
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
    from .correctness import Correctness
    from .plane import evaluate_plane
    from .plots import plot_plane

    val = Correctness.load(data_path("correctness_val.safetensors"))
    test = Correctness.load(data_path(f"correctness_{args.split}.safetensors"))
    by_uid = {s.uid: s for s in load_samples("val")}
    val_samples = [by_uid[u] for u in val.uids][: args.val_n]
    by_uid = {s.uid: s for s in load_samples(args.split)}
    test_samples = [by_uid[u] for u in test.uids][: args.n or len(test.uids)]
    # Controllers of one kind (their seeds) are one group: the plane shows their mean and intervals.
    controllers: dict[str, list] = {}
    for policy in policies:
        if isinstance(policy, ControllerPolicy):
            controllers.setdefault(policy.name, []).append(policy.controller)
    # Mean-latency targets over the achievable range of medians: the fastest to the full configuration.
    targets = torch.linspace(table.min_ms, table.reference_ms, args.budgets, dtype=torch.float64).tolist()
    plane = evaluate_plane(vlm, controllers, table, val, test, val_samples, test_samples, budgets, targets, quantile)
    print(format_plane(plane))
    payload = {"split": args.split, "n": len(test_samples), "val_n": len(val_samples), **plane}
    (out / "plane.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_plane(plane).savefig(out / "plane.png", dpi=120, bbox_inches="tight")
    print(f"saved {out / 'plane.json'} and {out / 'plane.png'}")
