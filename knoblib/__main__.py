"""Command line: ``python -m knoblib <command>`` (also installed as ``knoblib``).

Every command writes under ``runs/`` by default. The shipped artifacts in ``data/`` are
rebuilt, in order, by ``make artifacts``, which passes each command an explicit path in
``data/`` and ``--overwrite``::

    python -m knoblib data               # synthetic VQA splits + tokenizer -> runs/vqa, runs/tokenizer
    python -m knoblib pretrain           # the tiny MoE VLM        -> runs/model
    python -m knoblib rank-blocks        # block importance        -> runs/model_ranked (a copy of --model)
    python -m knoblib profile-latency    # latency of every config -> runs/latency_table.json
    python -m knoblib correctness        # which configs answer each question right -> runs/correctness_val.safetensors
    python -m knoblib config-accuracy    # val accuracy per config -> runs/config_accuracy_val.json
    python -m knoblib oracle-gap         # what a family-aware policy could win over the lookup table
    python -m knoblib knob-table         # README's knob table     -> runs/knob_table.json
    python -m knoblib expert-ablation    # why top_k is cheap      -> runs/expert_ablation.json
    python -m knoblib train --mode B     # GRPO controller         -> runs/B (--export DIR: the best controller)
        (shipped: see TRAIN_B in the Makefile: a fit to the correctness table, then GRPO with a price input)
    python -m knoblib train --mode A-resumable                     -> runs/A-resumable
    python -m knoblib evaluate           # the accuracy / latency plane     -> runs/eval/plane.json, plane.png
    python -m knoblib evaluate --measured  # served and timed one by one   -> runs/eval/measured.json
    python -m knoblib report data/eval   # the README's results table (markdown)
    python -m knoblib answer --image I --question Q --budget-ms B   # one budgeted answer (one JSON line)

Writing into ``data/`` or over an existing output needs an explicit path and
``--overwrite``; the check runs before any long work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .data import data_path
from .guard import DEFAULT_QUANTILE
from .outputs import check_output, runs_path


# --- numeric options: checked where they enter, so a bad value never reaches the work ---
def int_at_least(low: int):
    """argparse ``type=``: an integer >= ``low`` (``--n -998`` would otherwise slice from the end)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is invalid: must be an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(low: float, high: float | None = None, low_open: bool = False):
    """argparse ``type=``: a finite number >= ``low`` (> ``low`` with ``low_open``), <= ``high`` if given."""
    allowed = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a finite number {allowed}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is invalid: must be a finite number {allowed}")
        return value

    parse.__name__ = f"number {allowed}"
    return parse


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
POSITIVE_FLOAT = finite_float(0.0, low_open=True)
NON_NEGATIVE_FLOAT = finite_float(0.0)
FRACTION = finite_float(0.0, 1.0)
OVERWRITE_HELP = "replace an existing output, or write into the shipped data/ folder"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(data_path("model")), help="KnobVLM folder (default: data/model)")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _add_n(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=POSITIVE_INT, default=1000, help="samples from the start of the split (>= 1)")


def cmd_data(args) -> None:
    from .data import main as data_main

    data_main(["--out", args.out, "--tokenizer-out", args.tokenizer_out] + (["--overwrite"] if args.overwrite else []))


def cmd_pretrain(args) -> None:
    from .pretrain import PretrainConfig, pretrain

    check_output(args.out, args.overwrite, "--out", kind="dir")

    cfg = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        stage2_full_fraction=args.stage2_full_fraction,
    )
    from .pretrain import save_atomically

    # The run saves a checkpoint into --out at every evaluation, so it is checked above.
    vlm, history = pretrain(cfg, data_path(), checkpoint_dir=Path(args.out), device=args.device)
    save_atomically(vlm, Path(args.out))
    (Path(args.out) / "pretrain_log.json").write_text(json.dumps(history))
    print(f"saved the VLM to {args.out}")


def cmd_rank_blocks(args) -> None:
    import shutil

    from .assets import load_samples
    from .importance import block_importance
    from .outputs import replace_dir, staging_dir
    from .vlm import KnobVLM

    target = check_output(args.out, args.overwrite, "--out", kind="dir")
    vlm = KnobVLM.from_pretrained(args.model)
    samples = load_samples(args.split, args.n)
    result = block_importance(vlm, samples)
    vlm.set_block_importance(result["importance"])
    # A copy of the model folder (its other files, e.g. pretrain_log.json, included) with the
    # ranking, built next to --out and swapped in whole, so --out == --model is safe too.
    staged = staging_dir(target)
    try:
        shutil.copytree(args.model, staged, dirs_exist_ok=True)
        vlm.save_pretrained(staged)
        (staged / "block_importance.json").write_text(json.dumps({"split": args.split, "n": len(samples), **result}, indent=1))
        replace_dir(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    out = target / "block_importance.json"
    print(f"full accuracy {result['full_accuracy']:.3f}")
    for b, s in enumerate(result["importance"]):
        print(f"block {b}: accuracy drop {100 * s:+.1f} points")
    print(f"drop order (least important first): {result['drop_order']}; saved to {out}")


def cmd_profile_latency(args) -> None:
    from .latency import profile_command

    check_output(args.out, args.overwrite, "--out")
    profile_command(args.model, args.out, args.answer_tokens, args.repeats, args.warmup, args.num_samples)


def cmd_config_accuracy(args) -> None:
    from .assets import load_samples
    from .evaluate import config_accuracy, save_config_accuracy
    from .vlm import KnobVLM

    args.out = args.out or str(runs_path(f"config_accuracy_{args.split}.json"))
    check_output(args.out, args.overwrite, "--out")
    if args.correctness:
        # Per-sample correctness already says it: no need to run the model again.
        from .correctness import Correctness

        table = Correctness.load(args.correctness)
        result, samples = table.accuracy(), table.uids
        if table.split != args.split:
            raise ValueError(f"--correctness {args.correctness} holds the {table.split!r} split, not {args.split!r}")
    else:
        vlm = KnobVLM.from_pretrained(args.model)
        samples = load_samples(args.split, args.n)
        result = config_accuracy(vlm, samples, list(vlm.knob_space))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_config_accuracy(result, args.out, args.split)
    best = max(result, key=lambda k: result[k]["all"])
    print(f"{len(result)} configurations on {len(samples)} {args.split} samples; best {best.short()} "
          f"{result[best]['all']:.3f}; saved to {args.out}")


def cmd_correctness(args) -> None:
    from .assets import load_samples
    from .correctness import measure_correctness
    from .vlm import KnobVLM

    args.out = args.out or str(runs_path(f"correctness_{args.split}.safetensors"))
    check_output(args.out, args.overwrite, "--out")
    vlm = KnobVLM.from_pretrained(args.model)
    samples = load_samples(args.split, args.n)
    table = measure_correctness(vlm, samples, split=args.split)
    table.save(args.out)
    accuracy = table.accuracy()
    best = max(accuracy, key=lambda k: accuracy[k]["all"])
    solvable = float(table.correct.any(1).float().mean())
    print(f"{len(table.configs)} configurations x {len(table)} {args.split} questions; best {best.short()} "
          f"{accuracy[best]['all']:.3f}; {solvable:.3f} of the questions are answered right by some configuration; "
          f"saved to {args.out}")


def cmd_knob_table(args) -> None:
    from .assets import load_samples
    from .data import FAMILIES
    from .evaluate import config_accuracy, knob_table_configs
    from .latency import profile_latency
    from .vlm import KnobVLM

    check_output(args.out, args.overwrite, "--out")
    vlm = KnobVLM.from_pretrained(args.model)
    samples = load_samples(args.split, args.n)
    named = knob_table_configs(vlm.knob_space)
    configs = [k for _, k in named]
    acc = config_accuracy(vlm, samples, configs)
    lat = profile_latency(vlm, samples[:8], answer_tokens=args.answer_tokens, repeats=args.repeats, configs=configs)
    full_ms = lat.latency(configs[0])
    rows = []
    for name, k in named:
        rows.append({"name": name, "knobs": k.short(), **acc[k], "latency_ms": lat.latency(k),
                     "latency_vs_full": lat.latency(k) / full_ms})
    header = "| configuration | knobs | all | " + " | ".join(FAMILIES) + " | latency ms | vs full |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        fam = " | ".join(f"{100 * r[f]:.1f}" for f in FAMILIES)
        print(f"| {r['name']} | {r['knobs']} | {100 * r['all']:.1f} | {fam} | {r['latency_ms']:.1f} | {r['latency_vs_full']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"split": args.split, "n": len(samples), "machine": lat.machine, "rows": rows}, indent=1))
    print(f"saved to {args.out}")


def cmd_expert_ablation(args) -> None:
    from .assets import load_samples
    from .data import FAMILIES
    from .experts import expert_ablation, router_mass
    from .vlm import KnobVLM

    check_output(args.out, args.overwrite, "--out")
    vlm = KnobVLM.from_pretrained(args.model)
    samples = load_samples(args.split, args.n)
    mass = router_mass(vlm, samples)
    ablation = expert_ablation(vlm, samples)
    print(f"router probability kept by the k strongest experts (blocks >= 1, {mass['tokens']} token-blocks):")
    print("  " + "  ".join(f"k={k}: {m:.2f}" for k, m in mass["kept"].items()))
    header = "| experts | all | " + " | ".join(FAMILIES) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in ablation["rows"]:
        acc = row["accuracy"]
        print(f"| {row['name']} | {100 * acc['all']:.1f} | " + " | ".join(f"{100 * acc[f]:.1f}" for f in FAMILIES) + " |")
    out = {"split": args.split, "n": len(samples), "router_mass": mass, **ablation}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved to {args.out}")


def cmd_train(args) -> None:
    from .training import train_controller_command

    train_controller_command(args)


def cmd_evaluate(args) -> None:
    if args.variants:
        from .variants import variants_command

        return variants_command(args)
    from .training import evaluate_command

    evaluate_command(args)


def cmd_answer(args) -> None:
    from .serving import BudgetedVLM

    # Calibration reports go to stderr: stdout is the one JSON line.
    served = BudgetedVLM.from_pretrained(
        args.path, mode=args.mode, table=args.table, progress=False, log=lambda line: print(line, file=sys.stderr)
    )
    (result,) = served.answer([args.image], [args.question], args.budget_ms)
    print(json.dumps(result.as_dict()))


def cmd_oracle_gap(args) -> None:
    from .evaluate import family_oracle_gap, load_config_accuracy
    from .latency import BudgetSampler, LatencyTable

    table = LatencyTable.load(args.table)
    score = load_config_accuracy(args.score) if args.score else None
    rows = family_oracle_gap(
        table, load_config_accuracy(args.accuracy), BudgetSampler(table).sweep(args.budgets).tolist(), score
    )
    head = "| budget ms | lookup table | its val accuracy | family oracle val accuracy | gap |"
    if score is not None:
        head += " table on --score | family oracle on --score | gap there |"
    print(head)
    print("|---" * head.count(" | ") + "|---|")
    for r in rows:
        line = (f"| {r['budget_ms']:.1f} | {r['lookup']} | {r['lookup_accuracy']:.3f} | {r['oracle_accuracy']:.3f} "
                f"| {r['oracle_accuracy'] - r['lookup_accuracy']:+.3f} |")
        if score is not None:
            line += f" {r['lookup_score']:.3f} | {r['oracle_score']:.3f} | {r['oracle_score'] - r['lookup_score']:+.3f} |"
        print(line)
    if score is not None:
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        print(f"mean over budgets on --score: table {mean('lookup_score'):.4f}, family oracle {mean('oracle_score'):.4f}")


def cmd_report(args) -> None:
    from .report import report

    print(report(args.folder))


def cmd_tutorial(args) -> None:
    from .tutorial import run_tutorial

    run_tutorial(smoke=args.smoke)


def build_parser() -> argparse.ArgumentParser:
    """The ``knoblib`` parser with every command and its options (defaults included)."""
    parser = argparse.ArgumentParser(prog="knoblib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="generate the synthetic VQA splits and the tokenizer")
    p.add_argument("--out", default=str(runs_path("vqa")), help="folder for <split>.jsonl.gz (default: runs/vqa)")
    p.add_argument("--tokenizer-out", default=str(runs_path("tokenizer")), help="tokenizer folder (default: runs/tokenizer)")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("oracle-gap", help="what a family-aware policy could win over the lookup table (val)")
    p.add_argument("--table", default=str(data_path("latency_table.json")))
    p.add_argument("--accuracy", default=str(data_path("config_accuracy_val.json")))
    p.add_argument("--budgets", type=int_at_least(2), default=8, help="budgets in the sweep (>= 2)")
    p.add_argument(
        "--score",
        default=None,
        help="another split's config accuracy (config-accuracy --split test --out F): score the val choices there",
    )
    p.set_defaults(fn=cmd_oracle_gap)

    p = sub.add_parser("pretrain", help="train the tiny MoE VLM with random knobs")
    p.add_argument("--steps", type=POSITIVE_INT, default=5000)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument(
        "--stage2-full-fraction",
        type=FRACTION,
        default=0.95,
        help="share of randomly configured steps that keep every block and the default top-k",
    )
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda, ...)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--eval-every", type=NON_NEGATIVE_INT, default=500, help="steps between evaluations (0: only at the end)")
    p.add_argument("--out", default=str(runs_path("model")), help="where the VLM is saved (default: runs/model)")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("rank-blocks", help="block importance: accuracy drop per removed block")
    _add_model(p)
    p.add_argument("--split", default="val")
    _add_n(p)
    p.add_argument(
        "--out",
        default=str(runs_path("model_ranked")),
        help="where the model is saved with its ranking: a copy of --model (default: runs/model_ranked); "
        "--out equal to --model ranks it in place and needs --overwrite",
    )
    _add_overwrite(p)
    p.set_defaults(fn=cmd_rank_blocks)

    p = sub.add_parser("profile-latency", help="measure every configuration on this machine")
    _add_model(p)
    p.add_argument("--out", default=str(runs_path("latency_table.json")), help="default: runs/latency_table.json")
    p.add_argument(
        "--answer-tokens", type=POSITIVE_INT, default=2, help="tokens decoded per measurement (one word + eos)"
    )
    p.add_argument("--repeats", type=POSITIVE_INT, default=15)
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=2)
    p.add_argument("--num-samples", type=POSITIVE_INT, default=8)
    _add_overwrite(p)
    p.set_defaults(fn=cmd_profile_latency)

    p = sub.add_parser("config-accuracy", help="accuracy of every configuration (for the lookup table)")
    _add_model(p)
    p.add_argument("--split", default="val")
    _add_n(p)
    p.add_argument("--out", default=None, help="default: runs/config_accuracy_<split>.json")
    p.add_argument(
        "--correctness", default=None, help="derive it from this per-sample correctness table instead of running the model"
    )
    _add_overwrite(p)
    p.set_defaults(fn=cmd_config_accuracy)

    p = sub.add_parser("correctness", help="which configurations answer each question right (per sample)")
    _add_model(p)
    p.add_argument("--split", default="val")
    _add_n(p)
    p.add_argument("--out", default=None, help="default: runs/correctness_<split>.safetensors")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_correctness)

    p = sub.add_parser("knob-table", help="accuracy per family and latency, each knob moved alone")
    _add_model(p)
    p.add_argument("--split", default="test")
    _add_n(p)
    p.add_argument("--answer-tokens", type=POSITIVE_INT, default=3)
    p.add_argument("--repeats", type=POSITIVE_INT, default=7)
    p.add_argument("--out", default=str(runs_path("knob_table.json")), help="default: runs/knob_table.json")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_knob_table)

    p = sub.add_parser("expert-ablation", help="router mass and accuracy with fewer experts: why top_k is cheap")
    _add_model(p)
    p.add_argument("--split", default="test")
    _add_n(p)
    p.add_argument("--out", default=str(runs_path("expert_ablation.json")), help="default: runs/expert_ablation.json")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_expert_ablation)

    p = sub.add_parser("train", help="joint GRPO training of the controller")
    _add_model(p)
    p.add_argument("--mode", default="B", choices=["A-naive", "A-resumable", "B"])
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="GRPO steps in all (default: GRPOConfig's)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<mode>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/last with its saved settings: --steps may differ, other changed values need "
        "--override, the warm-start settings cannot change",
    )
    p.add_argument(
        "--override",
        action="store_true",
        help="with --resume: run (and record) the settings given here where they differ from the checkpoint's",
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help="seeds batches, budgets and knob draws (default 0)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="controller learning rate (default: GRPOConfig's)")
    p.add_argument("--entropy-coef", type=NON_NEGATIVE_FLOAT, default=None, help="entropy bonus (default: GRPOConfig's)")
    p.add_argument("--scale-rewards", default=None, choices=["group", "batch", "none"], help="advantage scaling")
    p.add_argument(
        "--kl-coef", type=NON_NEGATIVE_FLOAT, default=None, help="KL weight to the reference controller (default: GRPOConfig's)"
    )
    p.add_argument(
        "--warm-start-steps",
        type=NON_NEGATIVE_INT,
        default=None,
        help="Mode B: behaviour-cloning steps (on --warm-start-teacher, from data/config_accuracy_val.json) before GRPO",
    )
    p.add_argument("--warm-start-entropy", type=NON_NEGATIVE_FLOAT, default=None, help="entropy bonus during the warm start")
    p.add_argument(
        "--warm-start-teacher",
        default=None,
        choices=["correctness", "critic", "oracle", "table", "family-table"],  # knoblib.grpo.WARM_START_TEACHERS
        help="what the warm start fits: the expected reward from per-sample correctness (default), the best "
        "configuration under a critic fitted to that correctness, the per-question oracle, the lookup table, or the "
        "per-family table (see GRPOConfig.warm_start_teacher)",
    )
    p.add_argument(
        "--correctness",
        default=None,
        help="per-sample correctness of training questions for the correctness/critic/oracle warm start "
        "(default: data/correctness_train.safetensors; make it with `correctness --split train`)",
    )
    p.add_argument(
        "--saving-bonus",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="reward per unit of unused budget: how much accuracy a latency saving is worth (default: RewardConfig's 0.03)",
    )
    p.add_argument(
        "--max-price", type=NON_NEGATIVE_FLOAT, default=None, help="largest latency price trained on (0: budgets only)"
    )
    p.add_argument(
        "--average-fraction",
        type=FRACTION,
        default=None,
        help="share of training requests served at a latency price without a budget (the average-latency mode)",
    )
    p.add_argument(
        "--no-question",
        dest="use_question",
        action="store_const",
        const=False,
        default=None,
        help="the budget-only ablation: the controller does not see the question",
    )
    p.add_argument(
        "--vision-stats",
        dest="vision_stats",
        action="store_const",
        const=True,
        default=None,
        help="Mode B: Stage 2 also reads statistics of the vision features at the tier Stage 1 chose",
    )
    p.add_argument(
        "--hybrid",
        action="store_const",
        const=True,
        default=None,
        help="Mode B: a hybrid controller with a Mode-A head beside the Mode-B one, trained from the same rollouts",
    )
    p.add_argument(
        "--hybrid-grpo-coef",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="weight of the hybrid A head's clipped surrogate on the B head's rollouts (default: GRPOConfig's 1.0)",
    )
    p.add_argument(
        "--distill-from",
        default=None,
        metavar="DIR",
        help="Mode B: a trained Mode-A controller whose policy the student learns to match (needs --distill-steps "
        "and/or --distill-coef)",
    )
    p.add_argument(
        "--distill-steps",
        type=NON_NEGATIVE_INT,
        default=None,
        help="distillation steps before GRPO (after the warm start): from --distill-from, or a hybrid's B head into its A head",
    )
    p.add_argument(
        "--distill-coef",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="weight of the distillation KL alongside GRPO, at the rollouts' states (no extra forward)",
    )
    p.add_argument(
        "--export",
        default=None,
        help="copy the best controller here when done: a new folder, or an earlier export (with --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start --out again if it holds a run (its metrics.jsonl, best/ and last/ are replaced), replace an "
        "earlier export at --export, or write into the shipped data/ folder",
    )
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="every policy on the accuracy / mean-latency plane of the test split")
    _add_model(p)
    p.add_argument(
        "--controllers",
        nargs="*",
        default=None,
        help="controller folders (default: those of data/controller_A, controller_B, controller_B_budget_only that exist)",
    )
    p.add_argument("--split", default="test")
    p.add_argument(
        "--n", type=POSITIVE_INT, default=None, help="requests (>= 1; default: 1000, or 200 with --measured)"
    )
    p.add_argument("--budgets", type=int_at_least(2), default=8, help="budgets (and targets) in the sweep (>= 2)")
    p.add_argument("--val-n", type=POSITIVE_INT, default=400, help="validation questions the prices are found on")
    p.add_argument(
        "--measured",
        action="store_true",
        help="serve a seeded subset one request at a time and time each by the wall clock (writes measured.json)",
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="which requests --measured serves, and in what order")
    p.add_argument(
        "--table",
        default=None,
        help="latency table: local (this machine, calibrated; the default unless $KNOBLIB_LATENCY_TABLE names "
        "another), shipped, or a path",
    )
    p.add_argument(
        "--quantile", type=FRACTION, default=DEFAULT_QUANTILE, help="latency quantile the budget guard holds configurations to"
    )
    p.add_argument(
        "--variants",
        action="store_true",
        help="compare every controller variant (Mode A, Mode B, vision-aware B, distilled B, the hybrid served each way) "
        "on the plane, with training time per step and serving overhead per request: writes variants.json",
    )
    p.add_argument(
        "--timing-steps", type=NON_NEGATIVE_INT, default=10, help="with --variants: timed GRPO steps per variant (0: none)"
    )
    p.add_argument(
        "--serving-requests", type=NON_NEGATIVE_INT, default=40,
        help="with --variants: requests served one at a time per variant to time the serving overhead (0: none)",
    )
    p.add_argument(
        "--out", default=str(runs_path("eval")), help="folder for plane.json and plane.png, or measured.json (default: runs/eval)"
    )
    _add_overwrite(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("answer", help="answer one question about one image under a latency budget (one JSON line)")
    p.add_argument("--image", required=True, help="path to a 48x48 RGB image file")
    p.add_argument("--question", required=True)
    p.add_argument("--budget-ms", type=float, required=True, help="the latency budget in milliseconds on this machine")
    p.add_argument("--mode", default="B", choices=["A", "B"], help="the controller's Stage-2 mode")
    p.add_argument("--path", default=None, help="folder with model/ and controller_A|B/ (default: the shipped data/)")
    p.add_argument(
        "--table",
        default=None,
        help="latency table: local (this machine, calibrated; the default unless $KNOBLIB_LATENCY_TABLE names "
        "another), shipped, or a path",
    )
    p.set_defaults(fn=cmd_answer)

    p = sub.add_parser("report", help="the README's results table from an evaluation folder (plane.json, measured.json)")
    p.add_argument("folder", nargs="?", default="data/eval", help="folder written by `evaluate` (default: data/eval)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("tutorial", help="execute every notebook (full mode) and print where the results are")
    p.add_argument("--smoke", action="store_true")
    p.set_defaults(fn=cmd_tutorial)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .latency import serving_threads

    # One intra-op thread unless OMP_NUM_THREADS says otherwise (see serving_threads).
    serving_threads()
    start = time.perf_counter()
    args.fn(args)
    print(f"[{args.command} took {time.perf_counter() - start:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
