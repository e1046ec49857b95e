"""Loading the shipped assets: the VLM, this machine's latency table, the controllers.

Everything that notebooks, commands, benchmarks and the serving API load comes through
here, so there is one place that checks the pieces belong together.
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import data_path, load_split, split_path
from .latency import LatencyTable
from .vlm import KnobVLM

TABLE_SOURCES = ("local", "shipped")
# Overrides the default table source; the test suite sets "shipped" so that its numbers do
# not depend on how fast the machine running it is (calibration has tests of its own).
TABLE_ENV = "KNOBLIB_LATENCY_TABLE"
# Requests the calibration times: a few of the test split, so every family and question length shows up.
CALIBRATION_SAMPLES = 8


def load_samples(split: str, n: int | None = None, data_dir: str | Path | None = None) -> list:
    """The first ``n`` samples (all if None) of a split of the shipped VQA data (``train``, ``val``, ``test``)."""
    samples = load_split(split_path(Path(data_dir) if data_dir is not None else data_path("vqa"), split))
    return samples if n is None else samples[:n]


def latency_table(
    vlm: KnobVLM,
    table: str | Path | LatencyTable | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> LatencyTable:
    """The latency table to use with ``vlm``.

    Args:
        table: ``"local"`` (the default, unless ``$KNOBLIB_LATENCY_TABLE`` names another): this machine's table, calibrated against the
            shipped one (``knoblib.calibration.local_latency_table``: cached, shipped if a
            spot check agrees, else profiled here); ``"shipped"``: ``data/latency_table.json``
            as it is (it describes the machine that made the shipped artifacts); a path
            to a table file; or a ``LatencyTable``.
        cache_dir, progress, log: passed to the calibration.
    """
    if table is None:
        table = os.environ.get(TABLE_ENV) or "local"
    if isinstance(table, LatencyTable):
        result = table
    elif table == "local":
        from .calibration import local_latency_table

        shipped = LatencyTable.load(data_path("latency_table.json"))
        result = local_latency_table(
            vlm, shipped, load_samples("test", CALIBRATION_SAMPLES), cache_dir=cache_dir, progress=progress, log=log
        )
    elif table == "shipped":
        result = LatencyTable.load(data_path("latency_table.json"))
    elif isinstance(table, (str, Path)):
        result = LatencyTable.load(table)
    else:
        raise TypeError(f"table must be {list(TABLE_SOURCES)}, a path or a LatencyTable, got {type(table).__name__}")
    result.check_space(vlm.knob_space)
    return result


def load_assets(
    model_dir: str | Path | None = None,
    table: str | Path | LatencyTable | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> tuple[KnobVLM, LatencyTable]:
    """The VLM (default: the shipped ``data/model``) and its latency table on this machine (see :func:`latency_table`)."""
    vlm = KnobVLM.from_pretrained(model_dir or data_path("model"))
    return vlm, latency_table(vlm, table, cache_dir=cache_dir, progress=progress, log=log)
