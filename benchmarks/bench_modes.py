"""One GRPO training step in each execution mode (A-naive, A-resumable, B), side by side.

Part 1 builds one trainer per mode with ``make_trainer(vlm, table, GRPOConfig(mode=m,
batch_size=8, val_every=0))`` (fresh seeded controllers) and runs their ``train_step``
interleaved in rounds, all three modes on the same batch of requests and budgets in a
round; it reports the median ``step_time_s`` (and ``rollout_time_s``) per mode, the
forwards counted per request, and the ratios A-naive / B and A-resumable / B.

Part 2 is the partial-forward share: the batch-1 time of ``vlm.partial_forward`` (vision +
blocks [0, p), the original system's Mode-A extra forward) for p = 1..P, as a percentage
of one batch-1 ``generate`` of the full configuration (T decoded tokens), per tier. The
original system assumed 50 %; on realistic GPU shapes (an H200, MolmoE-sized) it measured
1-3 % (docs/background.md).

Usage: ``python benchmarks/bench_modes.py [--repeats 8] [--warmup 1] [--partial-repeats 20] [--json PATH]``
"""

from __future__ import annotations

import sys

import torch
from _common import (
    check_args,
    finish,
    header,
    load,
    machine,
    make_parser,
    median,
    ms,
    repeat_command,
    request_items,
    run_rounds,
)

from knoblib.grpo import MODES, GRPOConfig
from knoblib.knobs import KnobConfig
from knoblib.training import make_trainer

NAME = "bench_modes"
ORIGINAL_ASSUMED_SHARE = 50.0


def bench_steps(vlm, table, args) -> dict:
    trainers = {
        m: make_trainer(vlm, table, GRPOConfig(mode=m, batch_size=args.batch_size, val_every=0, seed=args.seed))
        for m in MODES
    }
    rounds = args.warmup + args.repeats
    # One batch per round for all modes (the trainers share one random seed, so this is also
    # the batch each would draw itself).
    batches = [trainers["B"].next_batch() for _ in range(rounds)]

    def step(mode):
        return lambda r: trainers[mode].train_step(batches[r])

    header(
        f"{NAME} (1/2): one GRPO step per mode, batch {args.batch_size} x group "
        f"{trainers['B'].cfg.group_size}, {args.repeats} rounds (+{args.warmup} warm-up)"
    )
    _, metrics = run_rounds({m: step(m) for m in MODES}, args.repeats, args.warmup, f"{NAME} steps")
    result = {}
    for m in MODES:
        steps = [x["step_time_s"] for x in metrics[m]]
        rollouts = [x["rollout_time_s"] for x in metrics[m]]
        result[m] = {
            "step": ms(steps),
            "rollout": ms(rollouts),
            "forwards_per_request": median([x["forwards_per_request"] for x in metrics[m]]),
            "partial_forwards": median([x["partial_forwards"] for x in metrics[m]]),
            "full_forwards": median([x["full_forwards"] for x in metrics[m]]),
        }
    b_step, b_roll = result["B"]["step"]["median_ms"], result["B"]["rollout"]["median_ms"]
    ratios = {
        f"{m}/B": {
            "step": result[m]["step"]["median_ms"] / b_step,
            "rollout": result[m]["rollout"]["median_ms"] / b_roll,
        }
        for m in MODES
        if m != "B"
    }
    print(f"{'mode':<12} {'step ms':>9} {'IQR':>7} {'rollout ms':>11} {'forwards/request':>17} {'step / B':>9}")
    for m in MODES:
        r = result[m]
        rel = r["step"]["median_ms"] / b_step
        print(
            f"{m:<12} {r['step']['median_ms']:>9.1f} {r['step']['iqr_ms']:>7.1f} {r['rollout']['median_ms']:>11.1f} "
            f"{r['forwards_per_request']:>17g} {rel:>9.3f}"
        )
    for key, v in ratios.items():
        print(f"ratio {key}: step {v['step']:.3f}, rollout {v['rollout']:.3f}")
    return {"modes": result, "ratios": ratios, "batch_size": args.batch_size, "group_size": trainers["B"].cfg.group_size}


def bench_partial(vlm, table, args) -> dict:
    space = vlm.knob_space
    T = args.tokens
    items = request_items(4)
    # A real Mode-A probe (its content does not change the work).
    from knoblib.controller import ControllerConfig, TwoStageController
    from knoblib.latency import BudgetSampler

    sampler = BudgetSampler(table)
    controller = TwoStageController(ControllerConfig.for_vlm(vlm, sampler.relative_range, mode="A", seed=args.seed))
    with torch.no_grad():
        probe = controller.probe_embeddings(torch.tensor([0.5 * sum(sampler.relative_range)])).detach()

    variants = {}
    for tier in space.tiers:
        full = KnobConfig(tier, space.max_insertion_position, space.default_top_k, space.num_layers)

        def gen(r, knobs=full):
            image, question = items[r % len(items)]
            vlm.generate([image], [question], knobs, max_new_tokens=T, min_new_tokens=T)

        variants[f"generate {tier}"] = gen
        for p in space.insertion_positions:

            def part(r, tier=tier, p=p):
                image, question = items[r % len(items)]
                vlm.partial_forward([image], [question], [(tier, p)], probe)

            variants[f"partial {tier} p={p}"] = part

    header(
        f"{NAME} (2/2): batch-1 partial_forward to p vs a batch-1 generate (T={T}) with all other knobs full, "
        f"{args.partial_repeats} rounds (+{args.warmup} warm-up)"
    )
    times, _ = run_rounds(variants, args.partial_repeats, args.warmup, f"{NAME} partial")
    stats = {k: ms(v) for k, v in times.items()}
    share: dict[str, dict[str, float]] = {}
    positions = space.insertion_positions
    print(f"{'tier':<8} {'generate ms':>12} " + " ".join(f"{'p=' + str(p) + ' ms':>9} {'share':>7}" for p in positions))
    for tier in space.tiers:
        g = stats[f"generate {tier}"]["median_ms"]
        share[tier] = {}
        cells = []
        for p in positions:
            pm = stats[f"partial {tier} p={p}"]["median_ms"]
            share[tier][str(p)] = 100.0 * pm / g
            cells.append(f"{pm:>9.2f} {share[tier][str(p)]:>6.1f}%")
        print(f"{tier:<8} {g:>12.2f} " + " ".join(cells))
    top = space.tiers[-1]
    values = list(share[top].values())
    print(
        f"partial-forward share of a full-configuration generate ({top} tier): "
        f"{min(values):.1f}-{max(values):.1f} % for p=1..{positions[-1]} "
        f"(the original system assumed {ORIGINAL_ASSUMED_SHARE:.0f} %)"
    )
    return {
        "answer_tokens": T, "timings": stats, "share_percent": share, "original_assumed_percent": ORIGINAL_ASSUMED_SHARE
    }


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0], repeats=8, warmup=1)
    parser.add_argument("--partial-repeats", type=int, default=20, help="recorded rounds of the partial-forward share")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per GRPO step")
    parser.add_argument("--tokens", type=int, default=GRPOConfig().answer_tokens, help="decoded tokens of the reference generate")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.partial_repeats < 1 or args.batch_size < 1 or args.tokens < 1:
        parser.error("--partial-repeats, --batch-size and --tokens must be >= 1")

    vlm, table = load(args)
    steps = bench_steps(vlm, table, args)
    partial = bench_partial(vlm, table, args)
    payload = {
        "benchmark": NAME,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "partial_repeats": args.partial_repeats,
        "model": args.model,
        "table": args.table,
        "steps": steps,
        "partial_forward": partial,
        "machine": machine(),
        "command": repeat_command(
            NAME, args, ["repeats", "warmup", "partial_repeats", "batch_size", "tokens", "seed", "model", "table"]
        ),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
