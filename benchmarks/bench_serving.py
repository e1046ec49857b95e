"""Serving by the wall clock: violations and accuracy of ``BudgetedVLM`` against the lookup table.

On this machine, in one run:

1. ``BudgetedVLM.from_pretrained()`` loads the shipped model, the shipped Mode-B (or
   ``--mode A``) controller and this machine's latency table (calibrated: the shipped
   table if a spot check agrees, else profiled here and cached);
2. the full configuration's batch-1 latency is measured here (median of ``--full-repeats``
   generates decoding the table's answer length);
3. ``--n`` test requests are served one at a time at budgets of 0.75x, 0.85x and 0.95x that
   latency (the cheapest configuration takes about 0.6x), each request by the controller
   and by the static lookup table in turn (alternating which goes first), each call timed
   from outside by the wall clock.

Targets (printed, never enforced; exit status 0), at every budget: the controller's
measured violation rate is at most 5 %, and its accuracy is within 1 point of the lookup
table's served the same way.

Usage: ``python benchmarks/bench_serving.py [--n 100] [--mode B] [--json PATH]``
"""

from __future__ import annotations

import statistics
import sys
import time

from _common import finish, header, machine, make_parser, repeat_command, verdict

from knoblib.assets import load_samples
from knoblib.data import data_path
from knoblib.evaluate import LookupTablePolicy, load_config_accuracy
from knoblib.serving import BudgetedVLM, Server

NAME = "bench_serving"
FRACTIONS = (0.75, 0.85, 0.95)
VIOLATION_TARGET = 0.05
ACCURACY_MARGIN = 0.01


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0], repeats=1, warmup=5)
    parser.add_argument("--n", type=int, default=100, help="test requests served at each budget")
    parser.add_argument("--mode", default="B", choices=["A", "B"], help="the controller's Stage-2 mode")
    parser.add_argument("--full-repeats", type=int, default=30, help="generates timed for the full configuration's latency")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    served = BudgetedVLM.from_pretrained(mode=args.mode)
    vlm, table = served.vlm, served.table
    test = load_samples("test", args.n)
    images = [s.image() for s in test]
    # Both servers read one estimate of the machine's drift (the controller's monitor):
    # two estimates from different requests differ by their sampling noise.
    accuracy = load_config_accuracy(data_path("config_accuracy_val.json"))
    lookup = Server(vlm, LookupTablePolicy(table, accuracy, served.quantile), table, monitor=served.server.monitor)
    lookup.warm_up(images, [s.question for s in test])
    T = table.answer_tokens
    full = vlm.knob_space.full()

    def timed_full(i: int) -> float:
        start = time.perf_counter()
        vlm.generate([images[i % len(images)]], [test[i % len(test)].question], full, max_new_tokens=T, min_new_tokens=T)
        return (time.perf_counter() - start) * 1000.0

    for i in range(args.warmup):
        timed_full(i)
    full_ms = statistics.median(timed_full(i) for i in range(args.full_repeats))
    header(f"{NAME}: {len(test)} test requests per budget, Mode {args.mode} vs the lookup table, full = {full_ms:.1f} ms here")

    def serve_controller(i: int, budget: float):
        start = time.perf_counter()
        (answer,) = served.answer([images[i]], [test[i].question], budget)
        return answer.text, answer.knobs, (time.perf_counter() - start) * 1000.0

    def serve_lookup(i: int, budget: float):
        start = time.perf_counter()
        text, knobs, _, _ = lookup.serve(images[i], test[i].question, budget)
        return text, knobs, (time.perf_counter() - start) * 1000.0

    rows, ok = [], True
    print(f"{'budget':>18} | {'policy':>13} | {'acc':>5} | {'mean ms':>7} | {'p95 ms':>7} | {'violations':>10}")
    for fraction in FRACTIONS:
        budget = fraction * full_ms
        records = {"controller": [], "lookup table": []}
        for i in range(len(test)):
            order = [("controller", serve_controller), ("lookup table", serve_lookup)]
            for name, serve in order if i % 2 == 0 else order[::-1]:
                text, knobs, ms = serve(i, budget)
                records[name].append((text == test[i].answer, ms, knobs.short()))
        summary = {}
        for name, rec in records.items():
            wall = sorted(ms for _, ms, _ in rec)
            summary[name] = {
                "accuracy": sum(c for c, _, _ in rec) / len(rec),
                "mean_ms": statistics.mean(wall),
                "p95_ms": wall[min(len(wall) - 1, int(0.95 * len(wall)))],
                "violation_rate": sum(ms > budget for ms in wall) / len(wall),
                "configurations": sorted(set(k for _, _, k in rec)),
            }
            s = summary[name]
            print(
                f"{fraction:.2f} x = {budget:7.1f} ms | {name:>13} | {s['accuracy']:.3f} | {s['mean_ms']:7.1f} | "
                f"{s['p95_ms']:7.1f} | {s['violation_rate']:10.3f}"
            )
        c, t = summary["controller"], summary["lookup table"]
        violation_ok = c["violation_rate"] <= VIOLATION_TARGET
        accuracy_ok = c["accuracy"] >= t["accuracy"] - ACCURACY_MARGIN
        ok &= violation_ok and accuracy_ok
        print(
            f"{'':>18}   controller violations <= 5 %: {verdict(violation_ok)}; accuracy within 1 point of the table "
            f"({100 * (c['accuracy'] - t['accuracy']):+.1f}): {verdict(accuracy_ok)}"
        )
        rows.append({"fraction": fraction, "budget_ms": budget, **{k.replace(" ", "_"): v for k, v in summary.items()},
                     "violation_ok": violation_ok, "accuracy_ok": accuracy_ok})
    print(f"all targets: {verdict(ok)}")
    payload = {
        "benchmark": NAME,
        "mode": args.mode,
        "n": len(test),
        "full_ms": full_ms,
        "quantile": served.quantile,
        "reserve_ms": {"controller": served.server.reserve_ms, "lookup table": lookup.reserve_ms},
        "slowdown_at_end": served.server.monitor.slowdown,
        "table": {"fingerprint": table.fingerprint, "reference_ms": table.reference_ms, "date": table.date},
        "rows": rows,
        "ok": ok,
        "machine": machine(),
        "command": repeat_command(NAME, args, ["n", "mode", "full_repeats"]),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
