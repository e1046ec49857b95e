"""Batch-1 end-to-end latency of the full configuration vs each knob moved alone and the cheapest.

Each measurement is one ``vlm.generate([image], [question], knobs, max_new_tokens=T,
min_new_tokens=T)`` (vision tower + prefill + exactly T decoded tokens, T = 3 by default),
the quantity the latency table stores. The configurations are those of
``knoblib.evaluate.knob_table_configs``: the full configuration, every knob moved alone to
each of its cheaper values, and the cheapest configuration. They are interleaved in rounds
(every configuration once per round, on the same request), warm-up rounds first; each row
reports the median over the recorded rounds and its ratio to the full configuration.

Targets (printed, never enforced; the exit status is 0):

* ``cheapest / full <= 0.60``;
* ``latency falls with each knob``: along each knob, every cheaper value is faster than
  the one before it (the full configuration first).

Usage: ``python benchmarks/bench_knobs.py [--repeats 20] [--warmup 3] [--tokens 3] [--json PATH]``
"""

from __future__ import annotations

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
    shown_path,
    verdict,
)

from knoblib.evaluate import knob_table_configs

NAME = "bench_knobs"
CHEAPEST_TARGET = 0.60


def knob_chains(rows: list[tuple[str, object]]) -> dict[str, list[str]]:
    """Per knob, the row names from the full configuration to that knob's cheapest value."""
    chains: dict[str, list[str]] = {}
    for name, _ in rows:
        if "=" in name:
            chains.setdefault(name.split("=", 1)[0], ["full"]).append(name)
    return chains


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__.split("\n\n")[0], repeats=20, warmup=3)
    parser.add_argument("--tokens", type=int, default=3, help="decoded tokens per generate (min = max)")
    parser.add_argument("--samples", type=int, default=4, help="test requests cycled through, one per round")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.tokens < 1 or args.samples < 1:
        parser.error("--tokens and --samples must be >= 1")

    vlm, table = load(args)
    items = request_items(args.samples)
    rows = knob_table_configs(vlm.knob_space)
    T = args.tokens

    def variant(knobs):
        def run(r: int) -> None:
            image, question = items[r % len(items)]  # one request per round, shared by all rows
            vlm.generate([image], [question], knobs, max_new_tokens=T, min_new_tokens=T)

        return run

    header(f"{NAME}: batch-1 generate latency, T={T} decoded tokens, {args.repeats} rounds (+{args.warmup} warm-up)")
    times, _ = run_rounds({name: variant(k) for name, k in rows}, args.repeats, args.warmup, NAME)

    stats = {name: ms(times[name]) for name, _ in rows}
    full_ms = stats["full"]["median_ms"]
    table_full = table.latency_ms.get(rows[0][1])
    results = []
    print(f"{'row':<12} {'knobs':<16} {'median ms':>10} {'IQR ms':>8} {'/ full':>7}   {'table ms':>9} {'/ full':>7}")
    for name, knobs in rows:
        s = stats[name]
        t_ms = table.latency_ms.get(knobs)
        t_ratio = t_ms / table_full if (t_ms is not None and table_full) else None
        row = {
            "row": name,
            "knobs": knobs.as_dict(),
            "label": knobs.short(),
            **s,
            "ratio_to_full": s["median_ms"] / full_ms,
            "table_ms": t_ms,
            "table_ratio_to_full": t_ratio,
        }
        results.append(row)
        t_cells = f"{t_ms:>9.2f} {t_ratio:>7.3f}" if t_ratio is not None else f"{'-':>9} {'-':>7}"
        print(
            f"{name:<12} {knobs.short():<16} {s['median_ms']:>10.2f} {s['iqr_ms']:>8.2f} "
            f"{row['ratio_to_full']:>7.3f}   {t_cells}"
        )
    print(
        f"(table ms: {shown_path(table.source)}, T={table.answer_tokens}, torch threads "
        f"{table.machine.get('torch_num_threads')}: another run, shown for reference only)"
    )

    cheapest_ratio = stats["cheapest"]["median_ms"] / full_ms
    chains = knob_chains(rows)
    falls = {}
    for knob, chain in chains.items():
        medians = [stats[n]["median_ms"] for n in chain]
        bad = [f"{a} -> {b}" for a, b, x, y in zip(chain, chain[1:], medians, medians[1:]) if not y < x]
        falls[knob] = {"chain": chain, "medians_ms": medians, "ok": not bad, "not_falling": bad}
    falls_ok = all(f["ok"] for f in falls.values())
    targets = {
        "cheapest_over_full": {"value": cheapest_ratio, "target": f"<= {CHEAPEST_TARGET}", "ok": cheapest_ratio <= CHEAPEST_TARGET},
        "latency_falls_with_each_knob": {"ok": falls_ok, "per_knob": falls},
    }
    print(f"target: cheapest / full <= {CHEAPEST_TARGET:.2f}: {cheapest_ratio:.3f}  {verdict(cheapest_ratio <= CHEAPEST_TARGET)}")
    details = "; ".join(
        f"{k} {' > '.join(f'{m:.1f}' for m in f['medians_ms'])} ms" + ("" if f["ok"] else f" (not falling: {', '.join(f['not_falling'])})")
        for k, f in falls.items()
    )
    print(f"target: latency falls with each knob: {verdict(falls_ok)}  ({details})")

    payload = {
        "benchmark": NAME,
        "answer_tokens": T,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "model": args.model,
        "table": args.table,
        "rows": results,
        "targets": targets,
        "machine": machine(),
        "command": repeat_command(NAME, args, ["repeats", "warmup", "tokens", "samples", "model", "table"]),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
