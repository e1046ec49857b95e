"""The controller's decision at batch 1 against the cheapest request, side by side in one run.

What is timed, interleaved in rounds (warm-up rounds first, not recorded):

* ``decision B``: the shipped Mode-B controller's whole decision for one request, as
  serving makes it (``ControllerPolicy.decide``: language features, budget encoding,
  Stage 1, Stage 2 and the budget guard), for each of ``--questions`` test questions at a
  budget in the middle of the achievable range;
* ``decision A``: the same for the Mode-A controller (Stage 1, and Stage 2 on a latency
  token, which serving runs at the pause);
* ``cheapest``: one batch-1 ``generate`` of the cheapest configuration, decoding the
  latency table's answer length (what the cheapest request costs the VLM).

Each decision's median is divided by the cheapest request's median. Then the same
decision is measured where it runs: ``BudgetedVLM`` serves ``--served`` requests one at a
time, and each answer's ``decision_ms`` (the controller's share of its wall clock) is
divided by the cheapest request's median. Target (printed, never enforced; exit status
0): the decision costs at most 2 % of the cheapest request.

Usage: ``python benchmarks/bench_overhead.py [--repeats 30] [--warmup 3] [--json PATH]``
"""

from __future__ import annotations

import statistics
import sys

from _common import check_args, finish, header, load, machine, make_parser, ms, repeat_command, run_rounds, verdict

from knoblib.assets import load_samples
from knoblib.controller import TwoStageController
from knoblib.data import data_path
from knoblib.evaluate import ControllerPolicy
from knoblib.serving import BudgetedVLM

NAME = "bench_overhead"
TARGET = 0.02


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0], repeats=30, warmup=3)
    parser.add_argument("--questions", type=int, default=20, help="test questions decided per round")
    parser.add_argument("--served", type=int, default=100, help="requests served one at a time for the in-place measurement")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.questions < 1 or args.served < 1:
        parser.error("--questions and --served must be >= 1")

    vlm, table = load(args)
    space = vlm.knob_space
    test = load_samples("test")
    questions = [s.question for s in test[: args.questions]]
    budget = 0.5 * (table.latency(table.fastest(), 0.95) + table.latency(space.full(), 0.95))
    policies = {
        mode: ControllerPolicy(TwoStageController.load(data_path(f"controller_{mode}"), expected_space=space), vlm, table=table)
        for mode in "AB"
    }
    image, question = test[0].image(), test[0].question
    cheapest = space.cheapest()
    T = table.answer_tokens

    def decide(mode):
        def run(r: int) -> None:
            for q in questions:
                policies[mode].decide(q, budget)

        return run

    def cheapest_request(r: int) -> None:
        vlm.generate([image], [question], cheapest, max_new_tokens=T, min_new_tokens=T)

    header(f"{NAME}: one decision vs the cheapest request ({cheapest.short()}, T={T}), {args.repeats} rounds")
    times, _ = run_rounds(
        {"decision B": decide("B"), "decision A": decide("A"), "cheapest": cheapest_request}, args.repeats, args.warmup, NAME
    )
    per_decision = {mode: [t / len(questions) for t in times[f"decision {mode}"]] for mode in "AB"}
    cheapest_stats = ms(times["cheapest"])
    rows = {}
    for mode in "BA":
        stats = ms(per_decision[mode])
        ratio = stats["median_ms"] / cheapest_stats["median_ms"]
        rows[mode] = {**stats, "over_cheapest": ratio, "ok": ratio <= TARGET}
        print(
            f"decision, Mode {mode}: {1000 * stats['median_ms']:7.1f} us (IQR {1000 * stats['iqr_ms']:.1f}) = "
            f"{100 * ratio:.2f} % of the cheapest request ({cheapest_stats['median_ms']:.2f} ms)  "
            f"target <= {100 * TARGET:.0f} %: {verdict(ratio <= TARGET)}"
        )

    # Where it runs: between real requests, with caches cooled by the VLM's work.
    served = BudgetedVLM(vlm, policies["B"].controller, table)
    requests = test[: args.served]
    answers = served.answer([s.image() for s in requests], [s.question for s in requests], budget)
    in_place = statistics.median(a.decision_ms for a in answers)
    in_place_ratio = in_place / cheapest_stats["median_ms"]
    print(
        f"decision, Mode B, while serving {len(answers)} requests: median {1000 * in_place:.1f} us = "
        f"{100 * in_place_ratio:.2f} % of the cheapest request  target <= {100 * TARGET:.0f} %: "
        f"{verdict(in_place_ratio <= TARGET)}"
    )
    payload = {
        "benchmark": NAME,
        "budget_ms": budget,
        "questions": len(questions),
        "cheapest": {**cheapest_stats, "knobs": cheapest.short(), "answer_tokens": T},
        "decision": rows,
        "serving": {"requests": len(answers), "median_decision_ms": in_place, "over_cheapest": in_place_ratio,
                    "ok": in_place_ratio <= TARGET},
        "target": TARGET,
        "machine": machine(),
        "command": repeat_command(NAME, args, ["repeats", "warmup", "questions", "served", "model", "table"]),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
