"""Run every benchmark in sequence (bench_knobs, bench_group, bench_modes) and print a summary.

``make benchmarks`` calls this. Options given here (--repeats, --warmup, --model, --table,
--threads) are passed to every benchmark; left out, each benchmark keeps its own default.
With --json PATH, all results go to one JSON file.

Usage: ``python benchmarks/run_all.py [--repeats N] [--threads N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_group  # noqa: E402
import bench_knobs  # noqa: E402
import bench_modes  # noqa: E402
import bench_overhead  # noqa: E402
from _common import REPO, THREAD_ENV, verdict  # noqa: E402

BENCHMARKS = (bench_knobs, bench_group, bench_modes, bench_overhead)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="recorded rounds for every benchmark (default: each its own)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds for every benchmark (default: each its own)")
    parser.add_argument("--model", default=None, help="KnobVLM folder (default: data/model)")
    parser.add_argument("--table", default=None, help="latency table (default: data/latency_table.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all results to this JSON file")
    args = parser.parse_args(argv)

    shared: list[str] = []
    for key in ("repeats", "warmup", "model", "table", "threads"):
        value = getattr(args, key)
        if value is not None:
            shared += [f"--{key}", str(value)]

    results, seconds = {}, {}
    for module in BENCHMARKS:
        start = time.perf_counter()
        results[module.NAME] = module.main(shared)
        seconds[module.NAME] = time.perf_counter() - start

    knobs, group, modes, overhead = (results[m.NAME] for m in BENCHMARKS)
    t = knobs["targets"]
    share = modes["partial_forward"]["share_percent"]
    top = list(share)[-1]
    steps = modes["steps"]
    print("\n=== summary ===")
    print(
        f"bench_knobs: cheapest / full = {t['cheapest_over_full']['value']:.3f} (target <= 0.60: "
        f"{verdict(t['cheapest_over_full']['ok'])}); latency falls with each knob: "
        f"{verdict(t['latency_falls_with_each_knob']['ok'])}"
    )
    s = group["speedups"]
    print(
        f"bench_group: sequential / batched = {s['group_sequential_over_batched']:.2f}x for a group of "
        f"{group['group_size']}, {s['batch_sequential_over_batched']:.2f}x for {group['requests']} x "
        f"{group['group_size']} rows"
    )
    fwd = ", ".join(f"{m} {v['forwards_per_request']:g}" for m, v in steps["modes"].items())
    rat = ", ".join(f"{k} {v['step']:.3f}" for k, v in steps["ratios"].items())
    print(f"bench_modes: step time {rat}; forwards per request: {fwd}")
    print(
        f"bench_modes: partial forward = {min(share[top].values()):.1f}-{max(share[top].values()):.1f} % "
        f"of a full batch-1 generate ({top} tier, p=1..{len(share[top])}; the original system assumed 50 %)"
    )
    d = overhead["decision"]
    print(
        f"bench_overhead: decision / cheapest request = Mode B {100 * d['B']['over_cheapest']:.2f} %, "
        f"Mode A {100 * d['A']['over_cheapest']:.2f} %, Mode B while serving "
        f"{100 * overhead['serving']['over_cheapest']:.2f} % (target <= 2 %: {verdict(d['B']['ok'] and overhead['serving']['ok'])})"
    )
    print("run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    python = sys.executable
    try:
        python = str(Path(python).relative_to(REPO))
    except ValueError:
        pass
    env = [f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ]
    command = f"cd {shlex.quote(str(REPO))} && " + " ".join(
        shlex.quote(p) for p in [*env, python, "benchmarks/run_all.py", *shared]
    )
    print(f"repeat all: {command}")
    payload = {"benchmarks": results, "run_time_s": seconds, "command": command}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
