"""GRPO rollouts with per-row knobs: sequential batch-1 generates vs one batched generate.

Mode B knows every knob before the VLM runs, so a GRPO group (one request, G rollouts
with different knobs) and even a whole batch of requests can run as ONE batched
``generate`` with per-row knobs. This benchmark measures what that buys, side by side
in one run:

* a group: 1 request x G rollouts (G = 5): G sequential batch-1 generates vs one
  batched generate of G rows;
* a batch: B requests x G rollouts (8 x 5 = 40 rows): 40 sequential batch-1 generates,
  B batched generates of G rows (one per group) and one batched generate of 40 rows.

Each rollout's knobs are drawn uniformly (seeded, G distinct configurations per group,
fresh each round) from the model's knob space, as an untrained controller samples them;
within a round every variant runs the same requests with the same knobs. Every generate
decodes exactly T tokens (``min_new_tokens = max_new_tokens = T``, T = 3 = GRPOConfig's
answer_tokens), so the work does not depend on the answers.

docs/background.md (section 4) reports 2.9x for a group of 5 on this CPU in the shipped
notebook run (2.7-3.4x across runs) and 4.9x on an H200.

Usage: ``python benchmarks/bench_group.py [--repeats 10] [--warmup 2] [--group-size 5] [--requests 8] [--json PATH]``
"""

from __future__ import annotations

import random
import sys

from _common import (
    check_args,
    finish,
    header,
    load,
    machine,
    make_parser,
    ms,
    repeat_command,
    request_items,
    run_rounds,
)

from knoblib.grpo import GRPOConfig

NAME = "bench_group"
# docs/background.md: a group of 5 on this CPU, the shipped notebook run.
REPORTED_CPU_SPEEDUP = 2.9


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0], repeats=10, warmup=2)
    parser.add_argument("--group-size", type=int, default=GRPOConfig().group_size, help="G, rollouts per request")
    parser.add_argument("--requests", type=int, default=GRPOConfig().batch_size, help="B, requests in the batch")
    parser.add_argument("--tokens", type=int, default=GRPOConfig().answer_tokens, help="decoded tokens per row (min = max)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.group_size < 2 or args.requests < 1 or args.tokens < 1:
        parser.error("--group-size must be >= 2, --requests and --tokens >= 1")

    vlm, _ = load(args)
    space = vlm.knob_space
    configs = list(space)
    if args.group_size > len(configs):
        parser.error(f"--group-size={args.group_size} exceeds the {len(configs)} configurations of the knob space")
    G, B, T = args.group_size, args.requests, args.tokens
    pool = request_items(max(B, 8))
    rounds = args.warmup + args.repeats

    # Per round: the requests and each row's knobs, shared by every variant of that round.
    plans = []
    for r in range(rounds):
        rng = random.Random(args.seed * 100_003 + r)
        group_request = pool[r % len(pool)]
        group_knobs = rng.sample(configs, G)
        requests = [pool[(r * B + i) % len(pool)] for i in range(B)]
        batch_knobs = [rng.sample(configs, G) for _ in range(B)]
        rows = [(req, k) for req, ks in zip(requests, batch_knobs) for k in ks]
        plans.append({"group": [(group_request, k) for k in group_knobs], "batch": rows})

    def generate(rows) -> None:
        vlm.generate([img for (img, _), _ in rows], [q for (_, q), _ in rows], [k for _, k in rows],
                     max_new_tokens=T, min_new_tokens=T)

    def sequential(key):
        def run(r: int) -> None:
            for row in plans[r][key]:
                generate([row])

        return run

    def batched(key):
        return lambda r: generate(plans[r][key])

    def per_group(r: int) -> None:
        rows = plans[r]["batch"]
        for start in range(0, len(rows), G):
            generate(rows[start : start + G])

    N = B * G
    names = {
        "group_sequential": f"{G} sequential batch-1 generates",
        "group_batched": f"1 batched generate of {G} rows",
        "batch_sequential": f"{N} sequential batch-1 generates",
        "batch_per_group": f"{B} batched generates of {G} rows (one per group)",
        "batch_batched": f"1 batched generate of {N} rows",
    }
    variants = {
        "group_sequential": sequential("group"),
        "group_batched": batched("group"),
        "batch_sequential": sequential("batch"),
        "batch_per_group": per_group,
        "batch_batched": batched("batch"),
    }
    header(
        f"{NAME}: GRPO rollouts with per-row knobs, T={T} decoded tokens, "
        f"{args.repeats} rounds (+{args.warmup} warm-up)"
    )
    times, _ = run_rounds(variants, args.repeats, args.warmup, NAME)
    stats = {k: ms(v) for k, v in times.items()}

    def ratio(slow: str, fast: str) -> float:
        return stats[slow]["median_ms"] / stats[fast]["median_ms"]

    speedups = {
        "group_sequential_over_batched": ratio("group_sequential", "group_batched"),
        "batch_sequential_over_batched": ratio("batch_sequential", "batch_batched"),
        "batch_sequential_over_per_group": ratio("batch_sequential", "batch_per_group"),
        "batch_per_group_over_batched": ratio("batch_per_group", "batch_batched"),
    }
    print(f"group: 1 request x {G} rollouts ({G} distinct knob configurations)")
    for key in ("group_sequential", "group_batched"):
        print(f"  {names[key]:<44} {stats[key]['median_ms']:>9.1f} ms  (IQR {stats[key]['iqr_ms']:.1f})")
    print(f"  speed-up, sequential / batched: {speedups['group_sequential_over_batched']:.2f}x")
    print(f"batch: {B} requests x {G} rollouts = {N} rows")
    for key in ("batch_sequential", "batch_per_group", "batch_batched"):
        print(f"  {names[key]:<44} {stats[key]['median_ms']:>9.1f} ms  (IQR {stats[key]['iqr_ms']:.1f})")
    print(f"  speed-up, sequential / one batched generate: {speedups['batch_sequential_over_batched']:.2f}x")
    print(f"  speed-up, sequential / one generate per group: {speedups['batch_sequential_over_per_group']:.2f}x")
    print(f"  speed-up, one generate per group / one for the batch: {speedups['batch_per_group_over_batched']:.2f}x")
    print(f"(docs/background.md: {REPORTED_CPU_SPEEDUP}x on this CPU for a group of 5 in the shipped notebook run)")

    payload = {
        "benchmark": NAME,
        "group_size": G,
        "requests": B,
        "answer_tokens": T,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "model": args.model,
        "variants": {k: {"description": names[k], **stats[k]} for k in variants},
        "speedups": speedups,
        "reported_cpu_speedup": REPORTED_CPU_SPEEDUP,
        "machine": machine(),
        "command": repeat_command(
            NAME, args, ["repeats", "warmup", "group_size", "requests", "tokens", "seed", "model", "table"]
        ),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
