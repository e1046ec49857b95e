"""The README's results table, regenerated from the evaluation files (``python -m knoblib report``).

``data/eval/plane.json`` (``python -m knoblib evaluate``) places every policy on the accuracy /
mean-latency plane; ``data/eval/measured.json`` (``evaluate --measured``) serves requests one at
a time and times them. This module turns both into the markdown table the README shows, so
every number there comes from a command anyone can repeat.
"""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(triple, scale: float = 100.0, unit: str = "") -> str:
    """'+1.2 [-0.3, +2.4]' from [mean, low, high]."""
    if triple is None:
        return "-"
    mean, low, high = (scale * x for x in triple)
    return f"{mean:+.1f}{unit} [{low:+.1f}, {high:+.1f}]"


def controller_summary(plane: dict, policy: str) -> dict:
    """One controller's headline numbers from the plane (per-request and average-latency modes)."""
    budgets = sorted((p for p in plane["points"] if p["policy"] == policy and p["kind"] == "budget"), key=lambda p: p["x"])
    targets = sorted((p for p in plane["points"] if p["policy"] == policy and p["kind"] == "target"), key=lambda p: p["x"])
    summary = {"policy": policy, "seeds": budgets[0]["seeds"] if budgets else None}
    if budgets:
        worst = min(budgets, key=lambda p: p["accuracy_vs_baseline"][0])
        summary["worst_accuracy_vs_table"] = worst["accuracy_vs_baseline"]
        summary["mean_accuracy_vs_table"] = sum(p["accuracy_vs_baseline"][0] for p in budgets) / len(budgets)
        summary["mean_latency_saving"] = sum(p["latency_saving_vs_baseline"][0] for p in budgets) / len(budgets)
        summary["top_budget_latency_saving"] = budgets[-1]["latency_saving_vs_baseline"]
    if targets:
        best = max(targets, key=lambda p: p["accuracy_vs_baseline"][0])
        worst = min(targets, key=lambda p: p["accuracy_vs_baseline"][0])
        summary["best_gain_over_hull"] = best["accuracy_vs_baseline"]
        summary["best_gain_target_ms"] = best["x"]
        summary["worst_gain_over_hull"] = worst["accuracy_vs_baseline"]
    return summary


def readme_table(plane: dict, measured: dict | None = None) -> str:
    """The README's results table: each trained controller against the lookup table and the hull."""
    policies = [p for p in dict.fromkeys(q["policy"] for q in plane["points"]) if "controller" in p]
    violations = {}
    if measured:
        for row in measured["rows"]:
            violations.setdefault(row["policy"], []).append(row["violation_rate"])
    lines = [
        "| controller (seeds) | per request: accuracy vs lookup table, worst budget (points) | mean latency saved | at the highest budget "
        "| mean latency target: best gain over the static hull (points) | worst | violations by the wall clock |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy in policies:
        s = controller_summary(plane, policy)
        measured_cell = "-"
        if policy in violations:
            rates = violations[policy]
            measured_cell = f"{100 * max(rates):.1f} % at worst ({100 * sum(rates) / len(rates):.1f} % mean)"
        target = f" at {s['best_gain_target_ms']:.0f} ms" if "best_gain_target_ms" in s else ""
        lines.append(
            f"| {policy} ({s['seeds']}) | {_fmt(s.get('worst_accuracy_vs_table'))} "
            f"| {100 * s.get('mean_latency_saving', 0):.1f} % "
            f"| {_fmt(s.get('top_budget_latency_saving'), unit=' %')} "
            f"| {_fmt(s.get('best_gain_over_hull'))}{target} | {_fmt(s.get('worst_gain_over_hull'))} | {measured_cell} |"
        )
    lines.append(
        f"\n{plane['n']} test questions, choices on validation; latencies from this machine's table (full configuration "
        f"{plane['reference_ms']:.1f} ms), the guard at p{round(100 * plane['quantile'])}; [95 % intervals: bootstrap over "
        "test questions and training seeds]."
    )
    if measured:
        lines.append(
            f"Violations: {measured['n']} test requests served one at a time at {len({r['budget_ms'] for r in measured['rows']})} "
            f"budgets, timed by the wall clock (`evaluate --measured`)."
        )
    return "\n".join(lines)


def report(folder: str | Path) -> str:
    """The README table from ``folder``'s ``plane.json`` (and ``measured.json`` if present)."""
    folder = Path(folder)
    plane_file = folder / "plane.json"
    if not plane_file.is_file():
        raise FileNotFoundError(f"{plane_file} is missing: make it with `python -m knoblib evaluate --out {folder}`")
    plane = json.loads(plane_file.read_text())
    measured_file = folder / "measured.json"
    measured = json.loads(measured_file.read_text()) if measured_file.is_file() else None
    return readme_table(plane, measured)
