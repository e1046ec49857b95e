"""Shared helpers for the benchmark scripts (not a benchmark itself).

Every benchmark measures its variants SIDE BY SIDE in one run: the variants are
interleaved in rounds (warm-up rounds first, not recorded), the order inside a round is
rotated so that no variant always runs first, and each variant reports the median over
the recorded rounds. Ratios are ratios of those medians. Absolute milliseconds depend on
the machine and its load; the ratios are what the benchmarks are for.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from knoblib.assets import load_assets, load_samples
from knoblib.data import data_path
from knoblib.latency import machine_info

REPO = Path(__file__).resolve().parent.parent
# Environment variables that change torch's thread pools: part of the command to repeat.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")


def quiet_transformers() -> None:
    """No weight-loading progress bars in benchmark output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def make_parser(description: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats, help="recorded rounds; each variant reports its median")
    parser.add_argument("--warmup", type=int, default=warmup, help="unrecorded rounds run first")
    parser.add_argument("--model", default=str(data_path("model")), help="KnobVLM folder (save_pretrained)")
    parser.add_argument(
        "--table", default=str(data_path("latency_table.json")), help="latency table profiled for that model"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seeds the knob draws and controllers")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads before measuring; None keeps torch's own"
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid: must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid: must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)


def load(args: argparse.Namespace):
    """The VLM and its latency table (checked to belong together), in eval mode."""
    quiet_transformers()
    vlm, table = load_assets(args.model, args.table)
    return vlm.eval(), table


def request_items(count: int) -> list[tuple[torch.Tensor, str]]:
    """(image, question) of the first ``count`` test samples, rendered once (rendering is not timed)."""
    samples = load_samples("test", count)
    if not samples:
        raise ValueError("the test split is empty: regenerate data/vqa with `python -m knoblib data`")
    return [(s.image(), s.question) for s in samples]


# --- measuring ----------------------------------------------------------------------
def run_rounds(
    variants: dict[str, Callable[[int], object]],
    repeats: int,
    warmup: int,
    label: str = "",
) -> tuple[dict[str, list[float]], dict[str, list[object]]]:
    """Run every variant once per round, ``warmup + repeats`` rounds, interleaved.

    Round r starts at variant ``r mod V`` (the order rotates), so drift of the machine
    spreads over all variants. Each callable gets the round index and may return a value
    (kept for the recorded rounds). Returns (seconds per variant, returned values per variant).
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, list[object]] = {n: [] for n in names}
    total = warmup + repeats
    for r in range(total):
        gc.collect()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            value = variants[name](r)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
                values[name].append(value)
        kind = "warm-up" if r < warmup else "round"
        index = r + 1 if r < warmup else r - warmup + 1
        print(f"  [{label}] {kind} {index}/{warmup if r < warmup else repeats}", file=sys.stderr, flush=True)
    return times, values


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[2] - q[0])


def ms(seconds: list[float]) -> dict:
    """Median and interquartile range in ms, plus the raw samples."""
    return {
        "median_ms": median(seconds) * 1000.0,
        "iqr_ms": iqr(seconds) * 1000.0,
        "samples_ms": [s * 1000.0 for s in seconds],
    }


# --- reporting ----------------------------------------------------------------------
def machine() -> dict:
    info = machine_info()
    try:
        info["load_avg"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        info["load_avg"] = None
    info["thread_env"] = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    return info


def machine_line(info: dict) -> str:
    line = (
        f"machine: {info.get('cpu_model') or info.get('processor') or info.get('machine')}, "
        f"{info.get('cpu_count')} CPUs, torch {info['torch']}, "
        f"torch threads {info['torch_num_threads']} (interop {info['torch_num_interop_threads']}), "
        f"python {info['python']}, load avg {info.get('load_avg')}"
    )
    load, cpus = info.get("load_avg"), info.get("cpu_count")
    if load is not None and cpus and load > 0.5 * cpus:
        line += (
            f"\nwarning: load average {load} on {cpus} CPUs: absolute times are inflated and noisy; "
            "the ratios were measured side by side"
        )
    return line


def shown_path(path: str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def repeat_command(script: str, args: argparse.Namespace, keys: list[str]) -> str:
    """The exact shell command that repeats this run (from any directory)."""
    python = sys.executable
    try:
        python = str(Path(python).relative_to(REPO))  # not resolved: keep the venv's own python
    except ValueError:
        pass
    parts = [f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ]
    parts += [python, f"benchmarks/{script}.py"]
    for key in [*keys, "threads"]:
        value = getattr(args, key)
        if value is None:
            continue
        if key in ("model", "table", "json"):
            value = shown_path(value)
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return f"cd {shlex.quote(str(REPO))} && " + " ".join(shlex.quote(p) for p in parts)


def header(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def finish(payload: dict, json_path: str | None) -> dict:
    """Print the command and the machine, write JSON if asked; return the payload."""
    print(machine_line(payload["machine"]))
    print(f"repeat: {payload['command']}", flush=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
    return payload
