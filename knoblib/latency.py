"""Latency profiling: what every knob configuration costs on *this* machine.

The controller is rewarded for meeting a latency budget, so it needs the latency each
configuration has when it is served alone (batch 1), not the wall time of a batched
training rollout. Which knob buys latency depends on the hardware (top-k is free at
batch 1 on a GPU but not on a CPU), and the same code runs several times slower on one
2-core machine than on another, so latency is measured on the machine that serves, never
modelled and never copied from another machine (``knoblib.calibration`` decides when a
table must be re-profiled).

* :func:`profile_latency` times ``vlm.generate`` at batch 1 for every configuration:
  vision tower + prefill + a fixed answer length ``T`` (``min_new_tokens =
  max_new_tokens = T``; T = 2 is one word plus end-of-sequence, all that the shipped
  model ever decodes), so the time does not depend on what the model answers.
* :class:`LatencyTable` stores each configuration's median and its tail (p90, p99, ...),
  the machine's fingerprint and the model's, and is saved as JSON without any path of
  the machine that made it.
* :class:`BudgetSampler` draws training budgets inside the range the table can achieve,
  and evenly spaced evaluation budgets.

Budgets that transfer between machines: a budget in milliseconds means a different
thing on a machine 4x slower, so the controller never sees milliseconds. It sees the
budget *relative to this machine's full-configuration latency*
(:meth:`LatencyTable.relative`): 0.75 means "three quarters of what the whole model
takes here", on every machine. The budget guard, the rewards and the measured
violations stay in this machine's milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .knobs import KNOB_FIELDS, TIERS, KnobConfig, KnobSpace

FILE_FORMAT = "knoblib-latency-table"
FILE_VERSION = 2
PROFILE_COMMAND = "python -m knoblib profile-latency"
# The tail quantiles a table keeps (besides the median); the budget guard uses one of them.
QUANTILES: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99)
# Tokens decoded per measurement: one word plus end-of-sequence, what the shipped
# model answers. Serving never decodes more than the table measured.
DEFAULT_ANSWER_TOKENS = 2
# Machine properties that latency depends on; the fingerprint hashes exactly these.
FINGERPRINT_KEYS = ("system", "machine", "cpu_model", "cpu_count", "torch", "torch_num_threads", "device", "gpu")

Measure = Callable[[KnobConfig, torch.Tensor, str], float]
"""One timed request: (configuration, image, question) -> milliseconds."""


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _space_dict(space: KnobSpace | dict) -> dict:
    """A knob space as the JSON-able dict that tables store (tiers as a list)."""
    if isinstance(space, KnobSpace):
        return space.as_dict()
    if isinstance(space, dict):
        return {**space, "tiers": list(space.get("tiers", TIERS))}
    raise TypeError(f"knob_space must be a KnobSpace or its as_dict(), got {type(space).__name__}")


def _space(space: dict) -> KnobSpace:
    return KnobSpace(**{**space, "tiers": tuple(space.get("tiers", TIERS))})


def serving_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for timing and serving, and return the number.

    None means ``$OMP_NUM_THREADS``, else 1. One thread is as fast as two for this tiny
    model at batch 1, and it does not stall when anything else runs: with as many threads
    as cores, OpenMP's busy-waiting threads fought a second process on a 2-core machine and
    one request took seconds instead of milliseconds. A latency table records the thread
    count it was measured with (``machine_info``); serving must use the same.
    """
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    if threads < 1:
        raise ValueError(f"threads={threads} is invalid: at least 1")
    torch.set_num_threads(threads)
    return threads


def machine_info(device: torch.device | str | None = None) -> dict:
    """What the latencies depend on: CPU, core count, torch build and threads, Python.

    The hostname is deliberately left out (tables are shipped and shared). With a CUDA
    device the GPU name is added.
    """
    info = {
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "device": str(device) if device is not None else "cpu",
    }
    # platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU model.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model_names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if model_names:
            info["cpu_model"] = model_names[0]
    except OSError:
        pass
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_fingerprint(info: dict) -> str:
    """A short hash of the machine properties latency depends on (``FINGERPRINT_KEYS``).

    Two machines with the same fingerprint may still differ in speed (cloud CPUs often
    report a generic model name), which is why calibration also spot-checks timings.
    """
    stable = {key: info.get(key) for key in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(vlm) -> str:
    """A short hash of what a ``KnobVLM``'s latency depends on: its sizes, block ranking and weights.

    The weights matter too: the experts run only for the tokens routed to them, so which
    experts a router picks changes the work.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(vlm.model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(vlm.block_importance).encode())
    for name, tensor in sorted(vlm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class LatencyTable:
    """Measured batch-1 end-to-end latency of each knob configuration.

    Attributes:
        latency_ms: configuration -> median (p50) latency in ms of one batch-1
            ``generate`` (vision + prefill + ``answer_tokens`` decoded tokens).
        knob_space: ``KnobSpace.as_dict()`` of the model that was profiled (a
            ``KnobSpace`` is accepted and converted).
        quantile_factors: q -> latency quantile q over the median, pooled over all
            configurations (``{0.5: 1.0, 0.9: 1.04, 0.99: 1.12}``, say): the tail of a
            configuration is its median times this factor. Why pooled: the spread on a
            CPU is the machine's (scheduling, caches, other processes), multiplicative
            and shared by every configuration, and pooling gives a p99 from hundreds of
            measurements instead of a maximum of fifteen. Default: no spread measured
            (every quantile equals the median), for hand-built tables.
        iqr_ms: configuration -> its own interquartile range (ms) over the repeats.
        vision_ms: tier -> median ms of ``vlm.embed`` (vision tower + projector +
            scatter) for that tier; the vision part of ``latency_ms``. Optional.
        answer_tokens: T, the fixed number of decoded tokens in each measurement.
        repeats: recorded measurements per configuration.
        warmup: unrecorded warm-up rounds before them.
        machine: see :func:`machine_info` (no hostname, no path).
        date: ISO-8601 UTC time of the profile.
        model_id: :func:`model_fingerprint` of the profiled model, or None.
        samples: uids of the samples cycled through while profiling.
        source: the file this table was loaded from (not saved, not compared).
    """

    latency_ms: dict[KnobConfig, float]
    knob_space: dict
    quantile_factors: dict[float, float] = field(default_factory=lambda: {q: 1.0 for q in QUANTILES})
    iqr_ms: dict[KnobConfig, float] = field(default_factory=dict)
    vision_ms: dict[str, float] = field(default_factory=dict)
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    repeats: int = 0
    warmup: int = 0
    machine: dict = field(default_factory=dict)
    date: str = ""
    model_id: str | None = None
    samples: list[str] = field(default_factory=list)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.knob_space = _space_dict(self.knob_space)
        if not self.latency_ms:
            raise ValueError("latency table is empty: profile at least one configuration")
        for knobs, ms in self.latency_ms.items():
            if not isinstance(knobs, KnobConfig):
                raise TypeError(f"latency_ms keys must be KnobConfig, got {type(knobs).__name__}")
            if not _finite(ms) or ms <= 0:
                raise ValueError(f"latency of {knobs.short()} is {ms!r} ms: must be a finite positive number")
        factors = {float(q): f for q, f in self.quantile_factors.items()}
        factors.setdefault(0.5, 1.0)
        for q, f in factors.items():
            if not 0.5 <= q < 1:
                raise ValueError(f"quantile_factors has quantile {q!r}: allowed 0.5 <= q < 1")
            if not _finite(f) or f < 1:
                raise ValueError(f"quantile_factors[{q}] = {f!r}: must be a finite number >= 1 (a tail over the median)")
        ordered = sorted(factors)
        if any(factors[a] > factors[b] for a, b in zip(ordered, ordered[1:])):
            raise ValueError(f"quantile_factors={factors} must not decrease with the quantile")
        self.quantile_factors = {q: float(factors[q]) for q in ordered}
        for knobs, ms in self.iqr_ms.items():
            if knobs not in self.latency_ms:
                raise ValueError(f"iqr_ms has {knobs.short()}, which has no latency")
            if not _finite(ms) or ms < 0:
                raise ValueError(f"spread (IQR) of {knobs.short()} is {ms!r} ms: must be finite and >= 0")
        for tier, ms in self.vision_ms.items():
            if tier not in TIERS:
                raise ValueError(f"vision_ms has unknown tier {tier!r}: allowed {list(TIERS)}")
            if not _finite(ms) or ms < 0:
                raise ValueError(f"vision latency of tier {tier!r} is {ms!r} ms: must be finite and >= 0")
        if isinstance(self.answer_tokens, bool) or not isinstance(self.answer_tokens, int) or self.answer_tokens < 1:
            raise ValueError(f"answer_tokens={self.answer_tokens!r} is invalid: must be an integer >= 1")
        # Fixed order (by latency, then by config) makes fastest()/feasible() deterministic on ties.
        self._by_latency = sorted(self.latency_ms, key=lambda k: (self.latency_ms[k], k))

    # --- lookups --------------------------------------------------------------------
    @property
    def configs(self) -> list[KnobConfig]:
        """The profiled configurations, in profiling order."""
        return list(self.latency_ms)

    @property
    def quantiles(self) -> tuple[float, ...]:
        """The quantiles this table can answer, median first."""
        return tuple(self.quantile_factors)

    @property
    def space(self) -> KnobSpace:
        """The profiled model's knob space."""
        return _space(self.knob_space)

    @property
    def fingerprint(self) -> str:
        """:func:`machine_fingerprint` of the machine this table was measured on."""
        return machine_fingerprint(self.machine)

    def __len__(self) -> int:
        return len(self.latency_ms)

    def __contains__(self, knobs: object) -> bool:
        return knobs in self.latency_ms

    def _missing(self, knobs: object) -> KeyError:
        label = knobs.short() if isinstance(knobs, KnobConfig) else repr(knobs)
        where = f" ({self.source})" if self.source else ""
        return KeyError(
            f"configuration {label} is not in the latency table{where}, which has {len(self)} "
            f"configurations of the knob space {self.knob_space}; re-profile this model with "
            f"`{PROFILE_COMMAND}`"
        )

    def factor(self, quantile: float) -> float:
        """The tail factor of ``quantile`` (1 for the median); ValueError for one not kept."""
        try:
            return self.quantile_factors[float(quantile)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"quantile={quantile!r} is not in this latency table: allowed {list(self.quantiles)}"
            ) from None

    def latency(self, knobs: KnobConfig, quantile: float = 0.5) -> float:
        """Latency of ``knobs`` in ms at ``quantile`` (the median by default); KeyError if not profiled."""
        factor = self.factor(quantile)
        try:
            return self.latency_ms[knobs] * factor
        except (KeyError, TypeError):
            raise self._missing(knobs) from None

    def latencies(self, knobs: Iterable[KnobConfig], quantile: float = 0.5) -> torch.Tensor:
        """Latencies of several configurations: float64 tensor (N,) in ms."""
        factor = self.factor(quantile)
        return torch.tensor([self.latency(k) * factor for k in knobs], dtype=torch.float64)

    def vision_latency(self, tier: str) -> float | None:
        """Median ms of the vision part for ``tier``, or None if it was not measured."""
        return self.vision_ms.get(tier)

    @property
    def min_ms(self) -> float:
        return self.latency_ms[self._by_latency[0]]

    @property
    def max_ms(self) -> float:
        return self.latency_ms[self._by_latency[-1]]

    def fastest(self) -> KnobConfig:
        return self._by_latency[0]

    def slowest(self) -> KnobConfig:
        return self._by_latency[-1]

    def feasible(self, budget_ms: float, quantile: float = 0.5) -> list[KnobConfig]:
        """Configurations whose latency at ``quantile`` is <= ``budget_ms``, fastest first (may be empty)."""
        factor = self.factor(quantile)
        return [k for k in self._by_latency if self.latency_ms[k] * factor <= budget_ms]

    # --- budgets that mean the same on every machine ----------------------------------
    @property
    def reference_ms(self) -> float:
        """The median latency of the full configuration here: the unit of relative budgets."""
        return self.latency(self.space.full())

    def relative(self, budget_ms):
        """Budget(s) in ms as a fraction of :attr:`reference_ms` (float or tensor, same shape)."""
        if isinstance(budget_ms, torch.Tensor):
            return budget_ms.to(torch.float64) / self.reference_ms
        return float(budget_ms) / self.reference_ms

    def absolute(self, budget_ratio):
        """The inverse of :meth:`relative`: fractions of the full configuration's latency -> ms here."""
        if isinstance(budget_ratio, torch.Tensor):
            return budget_ratio.to(torch.float64) * self.reference_ms
        return float(budget_ratio) * self.reference_ms

    def scaled(self, factor: float) -> "LatencyTable":
        """This table with every latency multiplied by ``factor``: a machine ``factor`` times slower.

        For tests and demonstrations of calibration (a synthetic slow machine); the
        relative budgets of every configuration are unchanged.
        """
        if not _finite(factor) or factor <= 0:
            raise ValueError(f"factor={factor!r} is invalid: must be a finite number > 0")
        return replace(
            self,
            latency_ms={k: ms * factor for k, ms in self.latency_ms.items()},
            iqr_ms={k: ms * factor for k, ms in self.iqr_ms.items()},
            vision_ms={t: ms * factor for t, ms in self.vision_ms.items()},
            source=None,
        )

    # --- consistency ----------------------------------------------------------------
    def check_space(self, space: KnobSpace | dict) -> None:
        """Raise ValueError if this table was profiled for a different knob space.

        A different space means another model (other depth or top-k): its latencies
        would silently be wrong for this one.
        """
        expected = _space_dict(space)
        if self.knob_space != expected:
            where = f" {self.source}" if self.source else ""
            raise ValueError(
                f"latency table{where} was profiled for knob space {self.knob_space}, but the model's "
                f"knob space is {expected}: the table comes from another model; re-profile with "
                f"`{PROFILE_COMMAND}`"
            )

    def missing(self, space: KnobSpace | None = None) -> list[KnobConfig]:
        """Configurations of ``space`` (default: the table's own) that this table has no latency for."""
        space = self.space if space is None else space
        return [k for k in space if k not in self.latency_ms]

    # --- rows and files -------------------------------------------------------------
    def to_rows(self) -> list[dict]:
        """One dict per configuration (profiling order) for printing and plotting.

        Keys: tier, insertion_position, top_k, num_active_blocks, latency_ms (the
        median), p90_ms and p99_ms (when kept), vision_ms (None if not measured),
        iqr_ms (None if unknown).
        """
        rows = []
        for k, ms in self.latency_ms.items():
            row = {**k.as_dict(), "latency_ms": ms}
            for q in (0.9, 0.99):
                if q in self.quantile_factors:
                    row[_quantile_key(q)] = ms * self.quantile_factors[q]
            rows.append({**row, "vision_ms": self.vision_ms.get(k.tier), "iqr_ms": self.iqr_ms.get(k)})
        return rows

    def to_json(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "knob_space": self.knob_space,
            "answer_tokens": self.answer_tokens,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "date": self.date,
            "model_id": self.model_id,
            "machine": self.machine,
            "fingerprint": self.fingerprint,
            "samples": list(self.samples),
            "vision_ms": dict(self.vision_ms),
            "quantile_factors": {str(q): f for q, f in self.quantile_factors.items()},
            # Each row carries its median and, for a reader of the file, its p90 and p99
            # (the median times the pooled factor); vision_ms lives per tier above.
            "rows": [
                {
                    **k.as_dict(),
                    "latency_ms": ms,
                    **{_quantile_key(q): ms * f for q, f in self.quantile_factors.items() if q in (0.9, 0.99)},
                    "iqr_ms": self.iqr_ms.get(k),
                }
                for k, ms in self.latency_ms.items()
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON, atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=1, allow_nan=False)
        # The temporary file must be in the same directory: os.replace is only atomic
        # within one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, complete: bool = True) -> "LatencyTable":
        """Read a table written by :meth:`save`.

        Raises FileNotFoundError (naming the path and the command that makes it) if the
        file is missing, and ValueError naming the path and the problem if it is corrupt
        or, with ``complete`` (the default), lacks a configuration of its knob space.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table not found: {path}; make it with `{PROFILE_COMMAND}`")

        def fail(problem: str) -> ValueError:
            return ValueError(f"corrupt latency table {path}: {problem}; re-profile with `{PROFILE_COMMAND}`")

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise fail(f"bad JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise fail("top level is not a JSON object")
        if data.get("format") != FILE_FORMAT:
            raise fail(f"format is {data.get('format')!r}, expected {FILE_FORMAT!r}")
        if data.get("version") != FILE_VERSION:
            raise fail(f"format version is {data.get('version')!r}, this knoblib reads version {FILE_VERSION}")
        missing = {"knob_space", "answer_tokens", "rows"} - set(data)
        if missing:
            raise fail(f"missing fields {sorted(missing)}")
        try:
            space = _space(data["knob_space"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise fail(f"invalid knob_space ({exc})") from exc
        rows = data["rows"]
        if not isinstance(rows, list) or not rows:
            raise fail("'rows' is not a non-empty list")
        latency_ms: dict[KnobConfig, float] = {}
        iqr_ms: dict[KnobConfig, float] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise fail(f"row {i} is not a JSON object")
            row_missing = (set(KNOB_FIELDS) | {"latency_ms"}) - set(row)
            if row_missing:
                raise fail(f"row {i} is missing fields {sorted(row_missing)}")
            try:
                knobs = space.validate(KnobConfig(*(row[f] for f in KNOB_FIELDS)))
            except (TypeError, ValueError) as exc:
                raise fail(f"row {i} has an invalid configuration ({exc})") from exc
            if knobs in latency_ms:
                raise fail(f"row {i} repeats configuration {knobs.short()}")
            ms = row["latency_ms"]
            if not _finite(ms) or ms <= 0:
                raise fail(f"row {i} ({knobs.short()}) has latency {ms!r} ms; latencies must be finite and positive")
            latency_ms[knobs] = float(ms)
            if row.get("iqr_ms") is not None:
                iqr_ms[knobs] = row["iqr_ms"]
        if complete:
            absent = [k.short() for k in space if k not in latency_ms]
            if absent:
                raise fail(
                    f"it lacks {len(absent)} of the {len(space)} configurations of its knob space "
                    f"(first: {', '.join(absent[:3])})"
                )
        vision_ms = data.get("vision_ms") or {}
        if not isinstance(vision_ms, dict):
            raise fail("'vision_ms' is not an object")
        factors = data.get("quantile_factors") or {str(q): 1.0 for q in QUANTILES}
        try:
            factors = {float(q): f for q, f in factors.items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise fail(f"invalid quantile_factors ({exc})") from exc
        try:
            return cls(
                latency_ms=latency_ms,
                knob_space=space.as_dict(),
                quantile_factors=factors,
                iqr_ms=iqr_ms,
                vision_ms=vision_ms,
                answer_tokens=data["answer_tokens"],
                repeats=data.get("repeats", 0),
                warmup=data.get("warmup", 0),
                machine=data.get("machine") or {},
                date=data.get("date") or "",
                model_id=data.get("model_id"),
                samples=list(data.get("samples") or []),
                source=str(path),
            )
        except (TypeError, ValueError) as exc:
            raise fail(str(exc)) from exc

    def summary(self) -> str:
        """A few lines: fastest and slowest configuration, their ratio, the tail, the setting."""
        fast, slow = self.fastest(), self.slowest()
        lines = [
            f"{len(self)} configurations, T={self.answer_tokens} answer tokens, "
            f"{self.repeats} repeats (+{self.warmup} warm-up), torch threads={self.machine.get('torch_num_threads')}",
            f"fastest {fast.short()}: {self.min_ms:.2f} ms",
            f"slowest {slow.short()}: {self.max_ms:.2f} ms",
            f"full configuration {self.space.full().short()}: {self.reference_ms:.2f} ms (the unit of relative budgets)",
            f"slowest / fastest = {self.max_ms / self.min_ms:.2f}x",
            "tail over the median: " + ", ".join(f"p{round(100 * q)} x{f:.3f}" for q, f in self.quantile_factors.items()),
        ]
        load = self.machine.get("load_avg_start")
        if load is not None and self.machine.get("cpu_count") and load > 0.5 * self.machine["cpu_count"]:
            lines.append(f"warning: load average was {load} on {self.machine['cpu_count']} CPUs: timings are noisy")
        if self.vision_ms:
            lines.append("vision: " + ", ".join(f"{t} {ms:.2f} ms" for t, ms in self.vision_ms.items()))
        return "\n".join(lines)


def _quantile_key(q: float) -> str:
    return f"p{round(100 * q)}_ms"


# --- profiling ----------------------------------------------------------------------
def _load_average() -> float | None:
    """1-minute load average (None where unsupported): a busy machine makes a noisy table."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock would stop before the GPU is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_items(samples: Sequence) -> tuple[list[tuple[torch.Tensor, str]], list[str]]:
    """(image, question) pairs, rendered once so rendering is not timed, plus uids."""
    items, uids = [], []
    for s in samples:
        if hasattr(s, "image") and hasattr(s, "question"):
            items.append((s.image(), s.question))
            uids.append(str(getattr(s, "uid", len(uids))))
        else:
            image, question = s
            items.append((image, question))
            uids.append(str(len(uids)))
    if not items:
        raise ValueError("profile_latency needs at least one sample (image, question) to run the model on")
    return items, uids


def generate_timer(vlm, answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> Measure:
    """The default :data:`Measure`: wall clock of one batch-1 ``vlm.generate`` decoding exactly T tokens."""
    device = torch.device(vlm.device)

    def measure(knobs: KnobConfig, image: torch.Tensor, question: str) -> float:
        _sync(device)
        start = time.perf_counter()
        vlm.generate([image], [question], knobs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens)
        _sync(device)
        return (time.perf_counter() - start) * 1000.0

    return measure


def pooled_quantile_factors(times: dict[KnobConfig, list[float]]) -> dict[float, float]:
    """q -> quantile q of every measurement over its configuration's median (see ``LatencyTable``)."""
    ratios = [t / _quantile(v, 0.5) for v in times.values() for t in v]
    factors = {0.5: 1.0}
    for q in QUANTILES[1:]:
        # Never below the previous quantile's factor, nor below 1: the tail is over the median.
        factors[q] = max(factors[max(factors)], _quantile(ratios, q), 1.0)
    return factors


def profile_latency(
    vlm,
    samples: Sequence,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    repeats: int = 15,
    warmup: int = 2,
    configs: Sequence[KnobConfig] | None = None,
    progress: bool = True,
    measure_vision: bool = True,
    seed: int = 0,
    measure: Measure | None = None,
) -> LatencyTable:
    """Measure every configuration's batch-1 end-to-end latency on this machine.

    Each measurement is ``time.perf_counter`` around one
    ``vlm.generate([image], [question], knobs, max_new_tokens=T, min_new_tokens=T)``:
    vision tower, prefill and exactly T decoded tokens, so the time does not depend on
    the answer. The repeats are *rounds*: round r measures every configuration once
    (in a shuffled order), so slow drift of the machine (another process, thermal
    throttling) spreads over all configurations instead of biasing the ones measured
    last. Configuration j uses sample ``(j + r) mod len(samples)`` in round r, so every
    configuration sees varied content. ``warmup`` extra rounds come first and are not
    recorded. torch's thread count is left as it is and written into the metadata.

    Args:
        vlm: a ``KnobVLM``.
        samples: ``VQASample``s (or (image uint8 (3, 48, 48), question) pairs), a few.
        answer_tokens: T, tokens decoded per measurement (>= 1).
        repeats: recorded rounds (>= 1); the table keeps the median, the IQR and the
            pooled tail factors (:func:`pooled_quantile_factors`).
        warmup: unrecorded rounds first (>= 0).
        configs: configurations to profile; default every one of ``vlm.knob_space``.
        progress: show a tqdm progress bar.
        measure_vision: also time ``vlm.embed`` per tier (the vision part), once per round.
        seed: seeds the per-round shuffle of the configuration order.
        measure: times one request (default :func:`generate_timer`); tests pass a
            synthetic one, so no test depends on this machine's speed.

    Returns:
        a :class:`LatencyTable` with latencies in ms.
    """
    for name, value, low in (("answer_tokens", answer_tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {low}")
    space: KnobSpace = vlm.knob_space
    if configs is None:
        configs = list(space)
    else:
        # dict.fromkeys drops duplicates but keeps the caller's order.
        configs = list(dict.fromkeys(space.validate(k) for k in configs))
        if not configs:
            raise ValueError("configs is empty: give at least one configuration to profile")
    items, uids = _as_items(samples)
    device = torch.device(vlm.device)
    timed = measure or generate_timer(vlm, answer_tokens)
    tiers = [t for t in TIERS if any(k.tier == t for k in configs)] if measure_vision and measure is None else []
    # Vision inputs per tier, built once: tokenising and cropping are not the vision tower.
    vision_inputs = {t: vlm.build_inputs([items[0][0]], [items[0][1]], [t]) for t in tiers}
    vision_inputs = {t: {k: v.to(device) for k, v in inp.items()} for t, inp in vision_inputs.items()}

    times: dict[KnobConfig, list[float]] = {k: [] for k in configs}
    vision_times: dict[str, list[float]] = {t: [] for t in tiers}
    rng = random.Random(seed)
    load_start = _load_average()
    from tqdm.auto import tqdm

    bar = tqdm(total=(warmup + repeats) * len(configs), desc="profiling latency", unit="run", disable=not progress)
    was_training = vlm.training
    vlm.eval()
    try:
        with torch.inference_mode():
            for r in range(warmup + repeats):
                record = r >= warmup
                order = list(range(len(configs)))
                rng.shuffle(order)
                for j in order:
                    knobs = configs[j]
                    image, question = items[(j + r) % len(items)]
                    elapsed_ms = timed(knobs, image, question)
                    if record:
                        times[knobs].append(elapsed_ms)
                    bar.update(1)
                for t in tiers:
                    inp = vision_inputs[t]
                    _sync(device)
                    start = time.perf_counter()
                    vlm.embed(inp["input_ids"], inp["pixel_values"])
                    _sync(device)
                    if record:
                        vision_times[t].append((time.perf_counter() - start) * 1000.0)
    finally:
        bar.close()
        vlm.train(was_training)

    latency_ms = {k: _quantile(v, 0.5) for k, v in times.items()}
    iqr_ms = {k: _quantile(v, 0.75) - _quantile(v, 0.25) for k, v in times.items()}
    vision_ms = {t: _quantile(v, 0.5) for t, v in vision_times.items()}
    machine = {**machine_info(device), "load_avg_start": load_start, "load_avg_end": _load_average()}
    return LatencyTable(
        latency_ms=latency_ms,
        knob_space=space.as_dict(),
        quantile_factors=pooled_quantile_factors(times),
        iqr_ms=iqr_ms,
        vision_ms=vision_ms,
        answer_tokens=answer_tokens,
        repeats=repeats,
        warmup=warmup,
        machine=machine,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_id=model_fingerprint(vlm),
        samples=uids,
    )


# --- budgets ------------------------------------------------------------------------
def check_budgets(budgets: torch.Tensor | Sequence[float], allow_inf: bool = False) -> torch.Tensor:
    """Validate budgets (ms, or relative to the full configuration) and return them as a 1-D float64 tensor (N,).

    Every policy and the controller check budgets with this one function: strings, NaN,
    infinities, zero and negative values are refused with the offending rows named. With
    ``allow_inf``, ``inf`` is accepted: it means "no per-request budget" (the
    average-latency mode), where every configuration fits.
    """
    if isinstance(budgets, str) or (isinstance(budgets, (list, tuple)) and any(isinstance(b, str) for b in budgets)):
        raise ValueError(f"budgets must be numbers, got strings: {budgets!r}")
    if not isinstance(budgets, torch.Tensor):
        if isinstance(budgets, (list, tuple)) and any(isinstance(b, bool) for b in budgets):
            raise ValueError(f"budgets must be real numbers, got booleans: {budgets!r}")
        try:
            # float64 from the start: a budget given as 43.4 ms stays 43.4 ms (float32: 43.400002).
            budgets = torch.as_tensor(budgets, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"budgets must be numbers, got {budgets!r}") from err
    if budgets.dtype == torch.bool or budgets.is_complex():
        raise ValueError(f"budgets must be real numbers, got dtype {budgets.dtype}")
    budgets = budgets.to(torch.float64)
    if budgets.dim() != 1:
        raise ValueError(f"budgets must be a 1-D tensor (N,), got shape {tuple(budgets.shape)}")
    if budgets.numel() == 0:
        raise ValueError("budgets is empty: give at least one budget")
    bad = (torch.isnan(budgets) | (budgets <= 0)) if allow_inf else (~torch.isfinite(budgets) | (budgets <= 0))
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        values = [float(budgets[r]) for r in rows[:5]]
        raise ValueError(
            f"budgets must be finite and > 0: got {values} at rows {rows[:5]}"
            + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        )
    return budgets


class BudgetSampler:
    """Latency budgets (ms) inside the range a latency table can actually achieve.

    Training budgets are uniform on ``[low, high] = [min_ms * (1 - margin), max_ms *
    (1 + margin)]``: a little below the fastest configuration (so the controller also
    sees budgets it cannot meet and learns to pick the cheapest) and a little above the
    slowest (where the full model fits). Budgets far outside this range teach nothing:
    every choice is then equally infeasible or equally feasible.

    Args:
        table: the profiled latencies.
        margin: relative extension of the range on both sides, in [0, 1).
        seed: seed of the sampler's own ``torch.Generator`` (independent of the global RNG).
    """

    def __init__(self, table: LatencyTable, margin: float = 0.1, seed: int = 0) -> None:
        if not _finite(margin) or not 0 <= margin < 1:
            raise ValueError(f"margin={margin!r} is invalid: must be in [0, 1)")
        self.table = table
        self.margin = float(margin)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def low(self) -> float:
        return self.table.min_ms * (1.0 - self.margin)

    @property
    def high(self) -> float:
        return self.table.max_ms * (1.0 + self.margin)

    @property
    def relative_range(self) -> tuple[float, float]:
        """``(low, high)`` as fractions of the table's full-configuration latency (what a controller is given)."""
        return self.table.relative(self.low), self.table.relative(self.high)

    def reset(self) -> None:
        """Restart the budget stream from the seed."""
        self.generator.manual_seed(self.seed)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` budgets uniform on [low, high]: float64 tensor (n,) in ms."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r} is invalid: must be an integer >= 0")
        u = torch.rand(n, generator=self.generator, dtype=torch.float64)
        return self.low + u * (self.high - self.low)

    def sweep(self, num: int = 8) -> torch.Tensor:
        """``num`` evenly spaced budgets from min_ms to max_ms: float64 tensor (num,) in ms.

        For evaluation: every budget is achievable, and the last fits the slowest configuration.
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"num={num!r} is invalid: must be an integer >= 2")
        # float64 end to end: a float32 round-trip would put the ends just outside the table.
        return torch.linspace(self.table.min_ms, self.table.max_ms, num, dtype=torch.float64)


# --- command ------------------------------------------------------------------------
def profile_command(
    model_dir: str | Path,
    out_path: str | Path,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    repeats: int = 15,
    warmup: int = 2,
    num_samples: int = 8,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Profile a saved ``KnobVLM`` over its whole knob space, save the table, print a summary.

    Uses the first ``num_samples`` samples of the test split (families come in shuffled
    rounds, so a few samples already mix question families and lengths).
    """
    from .assets import load_samples
    from .vlm import KnobVLM

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: must be an integer >= 1")
    vlm = KnobVLM.from_pretrained(model_dir)
    samples = load_samples("test", num_samples, data_dir)
    print(
        f"profiling {len(vlm.knob_space)} configurations of {model_dir} on {len(samples)} samples "
        f"(T={answer_tokens}, repeats={repeats}, warmup={warmup}, torch threads={torch.get_num_threads()})",
        file=sys.stderr,
    )
    table = profile_latency(vlm, samples, answer_tokens=answer_tokens, repeats=repeats, warmup=warmup, progress=progress)
    path = table.save(out_path)
    print(table.summary())
    print(f"saved -> {path}")
    return table
