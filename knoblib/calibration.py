"""On-machine calibration: make sure the latency table describes the machine that serves.

A latency table measured on one machine is wrong on another: the same code ran 4.3-4.5x
slower on a 2-core Intel Xeon than on the AMD EPYC that made the shipped table, and a
controller served there with the shipped table violated every budget by the wall clock.
So before a model is served or evaluated, :func:`local_latency_table` decides which table
to trust:

1. the table cached for this machine and this model, if there is one, else the shipped one;
2. if it was measured on a machine with another fingerprint (CPU model, cores, torch
   build and threads, device: :func:`knoblib.latency.machine_fingerprint`), or for
   another model, it is not trusted;
3. otherwise a **spot check** times a few configurations (the fastest, a middle one, the
   full one) and compares their medians with the table: cloud machines often report the
   same generic CPU name at different speeds, so an equal fingerprint is not enough;
4. if the table is not trusted, the whole knob space is profiled here (a progress bar),
   saved in the per-machine cache (never over the shipped table) and used.

Each decision is reported in one line. The cache lives in ``$KNOBLIB_CACHE_DIR`` or
``~/.cache/knoblib`` (``$XDG_CACHE_HOME/knoblib``), one file per (model, machine).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .knobs import KnobConfig
from .latency import (
    LatencyTable,
    Measure,
    _as_items,
    generate_timer,
    machine_fingerprint,
    machine_info,
    model_fingerprint,
    profile_latency,
)

DEFAULT_TOLERANCE = 0.25
SPOT_CHECK_REPEATS = 5


def default_cache_dir() -> Path:
    """Where per-machine latency tables are cached: ``$KNOBLIB_CACHE_DIR``, else the user cache."""
    if os.environ.get("KNOBLIB_CACHE_DIR"):
        return Path(os.environ["KNOBLIB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "knoblib"


def cache_path(cache_dir: str | Path, model_id: str, fingerprint: str) -> Path:
    """The cached table of one model on one machine."""
    return Path(cache_dir) / "latency" / f"{model_id}-{fingerprint}.json"


@dataclass
class SpotCheck:
    """A few configurations timed here against a table.

    Attributes:
        configs: the configurations timed.
        table_ms: their median latency in the table.
        measured_ms: their median latency measured now.
    """

    configs: list[KnobConfig]
    table_ms: list[float]
    measured_ms: list[float]

    @property
    def ratios(self) -> list[float]:
        """measured / table per configuration (4.0: this machine is 4x slower)."""
        return [m / t for m, t in zip(self.measured_ms, self.table_ms)]

    @property
    def ratio(self) -> float:
        """The median ratio: how much slower (> 1) or faster (< 1) this machine is."""
        return statistics.median(self.ratios)

    def agrees(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        """True when every configuration is within ``1 + tolerance`` times the table, either way."""
        limit = math.log1p(tolerance)
        return all(abs(math.log(r)) <= limit for r in self.ratios)

    def describe(self) -> str:
        return ", ".join(
            f"{k.short()} {m:.1f} ms vs {t:.1f}" for k, m, t in zip(self.configs, self.measured_ms, self.table_ms)
        )


def spot_check_configs(table: LatencyTable) -> list[KnobConfig]:
    """The fastest, the median and the full configuration of a table (three points across its range)."""
    ranked = sorted(table.configs, key=table.latency)
    picks = [ranked[0], ranked[len(ranked) // 2], table.space.full()]
    return list(dict.fromkeys(picks))


def spot_check(
    vlm,
    table: LatencyTable,
    samples: Sequence,
    repeats: int = SPOT_CHECK_REPEATS,
    warmup: int = 1,
    measure: Measure | None = None,
) -> SpotCheck:
    """Time :func:`spot_check_configs` here (median of ``repeats`` after ``warmup``) against ``table``."""
    items, _ = _as_items(samples)
    timed = measure or generate_timer(vlm, table.answer_tokens)
    configs = spot_check_configs(table)
    measured = []
    with torch.inference_mode():
        for knobs in configs:
            runs = [timed(knobs, *items[i % len(items)]) for i in range(warmup + repeats)]
            measured.append(statistics.median(runs[warmup:]))
    return SpotCheck(configs, [table.latency(k) for k in configs], measured)


def trust(table: LatencyTable, model_id: str, fingerprint: str) -> str | None:
    """Why ``table`` cannot describe this model on this machine, or None if nothing rules it out."""
    if table.model_id != model_id:
        return f"it was profiled for another model ({table.model_id} != {model_id})"
    if table.fingerprint != fingerprint:
        theirs = table.machine.get("cpu_model") or table.machine.get("processor") or "?"
        ours = machine_info().get("cpu_model") or "?"
        return f"it was measured on another machine ({theirs}, {table.machine.get('cpu_count')} CPUs, " \
               f"{table.machine.get('torch_num_threads')} torch threads; this is {ours}, {os.cpu_count()} CPUs, " \
               f"{torch.get_num_threads()} torch threads)"
    return None


def local_latency_table(
    vlm,
    shipped: LatencyTable | None,
    samples: Sequence,
    cache_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    measure: Measure | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    profile_kwargs: dict | None = None,
) -> LatencyTable:
    """The latency table of ``vlm`` on this machine: cached, shipped if it still holds, or profiled now.

    Args:
        vlm: the ``KnobVLM`` that will serve.
        shipped: the table that came with the model (may be None).
        samples: a few requests (``VQASample`` or (image, question)) to time.
        cache_dir: default :func:`default_cache_dir`.
        tolerance: a spot-checked configuration may differ from the table by this
            relative amount either way (0.25: between 0.8x and 1.25x) before re-profiling.
        measure: times one request (default: the wall clock of ``vlm.generate``); tests
            pass a synthetic one (a machine 4x slower, say), so they time nothing.
        progress: a progress bar while profiling.
        log: where the one-line report goes.
        profile_kwargs: extra arguments for :func:`knoblib.latency.profile_latency`.

    Returns:
        the table to serve with; when it was profiled here it is also in the cache.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r} is invalid: must be a finite number > 0")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    model_id = model_fingerprint(vlm)
    fingerprint = machine_fingerprint(machine_info(vlm.device))
    cached_file = cache_path(cache_dir, model_id, fingerprint)

    candidates: list[tuple[str, LatencyTable]] = []
    if cached_file.is_file():
        try:
            candidates.append(("cached", LatencyTable.load(cached_file)))
        except ValueError as err:  # a cache file we wrote but cannot read: profile again
            log(f"latency table: ignoring the unreadable cache {cached_file} ({err})")
    if shipped is not None:
        candidates.append(("shipped", shipped))

    reason = "no latency table was given or cached for this machine"
    for origin, table in candidates:
        reason = trust(table, model_id, fingerprint)
        if reason is None:
            check = spot_check(vlm, table, samples, measure=measure)
            if check.agrees(tolerance):
                where = f" ({cached_file})" if origin == "cached" else ""
                log(
                    f"latency table: the {origin} table{where} holds on this machine "
                    f"(spot check {check.ratio:.2f}x its medians, tolerance {tolerance:.0%})"
                )
                return table
            reason = f"a spot check measured {check.ratio:.2f}x its medians ({check.describe()})"
        reason = f"the {origin} table does not fit: {reason}"

    table = profile_latency(vlm, samples, progress=progress, measure=measure, **(profile_kwargs or {}))
    table.save(cached_file)
    log(f"latency table: profiled this machine because {reason}; cached in {cached_file}")
    return table
