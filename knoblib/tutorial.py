"""Execute the tutorial notebooks with papermill (``make tutorial`` and the notebook tests).

Each notebook has a ``parameters`` cell with ``SMOKE`` (shrinks every loop) and
``RESULTS_DIR`` (where it writes ``<name>.json`` with its key numbers). Full runs are
written back in place, with volatile metadata and widget state stripped, so the
repository shows real outputs; smoke runs (tests) go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "knoblib"
CELL_TIMEOUT_S = 1200


def notebooks() -> list[Path]:
    """The numbered tutorial notebooks, in order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _environment() -> None:
    # Figures must be kept (an inherited MPLBACKEND=Agg silently drops them) and the
    # venv's kernelspec must win over a user-level one of the same name.
    os.environ.pop("MPLBACKEND", None)
    # The tiny model runs as fast on one intra-op thread as on two, and one thread does
    # not stall when anything else runs on a 2-core machine (two threads spin-wait and
    # can run 10-20x slower). The kernel inherits this; the latency table is profiled
    # the same way (see knoblib/__main__.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    venv_jupyter = Path(os.sys.prefix) / "share" / "jupyter"
    if venv_jupyter.is_dir():
        paths = [str(venv_jupyter)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
        os.environ["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(paths))


def execute(notebook: Path, output: Path, smoke: bool, results_dir: Path, timeout_s: int = CELL_TIMEOUT_S) -> float:
    """Run one notebook with papermill from its own folder; return the wall time in seconds."""
    import papermill as pm

    _environment()
    start = time.perf_counter()
    pm.execute_notebook(
        str(notebook),
        str(output),
        parameters={"SMOKE": smoke, "RESULTS_DIR": str(results_dir)},
        kernel_name=KERNEL_NAME,
        cwd=str(notebook.parent),
        execution_timeout=timeout_s,
        progress_bar=False,
    )
    return time.perf_counter() - start


def strip_volatile(path: Path) -> None:
    """Remove widget state, execution timestamps and papermill timings from an executed notebook."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    # The cell papermill injects holds this machine's absolute paths; the parameters cell
    # above it already shows the values a full run uses.
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.metadata.pop("widgets", None)
    nb.metadata.get("papermill", {}).pop("start_time", None)
    nb.metadata.get("papermill", {}).pop("end_time", None)
    nb.metadata.get("papermill", {}).pop("duration", None)
    nb.metadata.get("papermill", {}).pop("input_path", None)
    nb.metadata.get("papermill", {}).pop("output_path", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        pm_meta = cell.metadata.get("papermill")
        if pm_meta is not None:
            for key in ("start_time", "end_time", "duration"):
                pm_meta.pop(key, None)
        for out in cell.get("outputs", []):
            # Widget views refer to state that is not saved; keep their text fallback only.
            data = out.get("data")
            if data is not None:
                data.pop("application/vnd.jupyter.widget-view+json", None)
    nbformat.write(nb, str(path))


def run_tutorial(smoke: bool = False) -> dict[str, float]:
    """Execute every notebook in order (in place unless ``smoke``); print where the results are."""
    import tempfile

    results_dir = NOTEBOOK_DIR / "results"
    out_dir = NOTEBOOK_DIR
    if smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="knoblib-smoke-"))
        results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    for nb in notebooks():
        print(f"running {nb.name} ({'smoke' if smoke else 'full'} mode) ...", flush=True)
        output = out_dir / nb.name
        times[nb.name] = execute(nb, output, smoke, results_dir)
        if not smoke:
            strip_volatile(output)
        print(f"  done in {times[nb.name]:.0f} s", flush=True)
    (results_dir / "run_times.json").write_text(json.dumps(times, indent=1))
    print(f"\nexecuted notebooks: {out_dir}")
    print(f"key numbers (one JSON per notebook): {results_dir}")
    print(f"total {sum(times.values()):.0f} s")
    return times
