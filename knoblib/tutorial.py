"""Execute the tutorial notebooks with papermill (``make tutorial`` and the notebook tests).

Each notebook has a ``parameters`` cell with ``SMOKE`` (shrinks every loop) and
``RESULTS_DIR`` (where it writes ``<name>.json`` with its key numbers, :func:`save_results`).
Full runs are written back in place, with volatile metadata, widget state, progress bars
and this machine's absolute paths stripped (:func:`strip_volatile`), so the repository
shows real, clean outputs; smoke runs (tests) go to a temporary folder.

A notebook calls :func:`quiet` once (no progress bars from transformers in its outputs)
and :func:`save_results` in its last cell. :func:`notebook_problems` checks the teaching
structure every numbered notebook keeps (title, learning goals, summary, exercises, a
reading of every figure) and that its outputs are clean; a test runs it on the committed
notebooks.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_DIR / "notebooks"
SOLUTIONS = NOTEBOOK_DIR / "solutions.ipynb"
KERNEL_NAME = "knoblib"
CELL_TIMEOUT_S = 1200


def notebooks() -> list[Path]:
    """The numbered tutorial notebooks, in order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


# --- what a notebook calls ------------------------------------------------------------------
def quiet() -> None:
    """No progress bars from transformers (weight loading, checkpoint writing) and only its errors.

    Progress bars are animation frames: in a saved notebook they are noise. knoblib's own
    loops take ``progress=False`` in the notebooks.
    """
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def _jsonable(value):
    """``value`` with tensors, numpy scalars and knob configurations as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    from .knobs import KnobConfig

    if isinstance(value, KnobConfig):
        return value.short()
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def save_results(results: dict, name: str, results_dir: str | Path) -> None:
    """Write a notebook's key numbers to ``results_dir/name.json`` and say how many.

    The notebook tests read this file (``tests/test_nbXX.py``): what a test checks is a
    number here, never an ``assert`` in the notebook. Prints no path (outputs are committed).
    """
    path = Path(results_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    print(f"{len(results)} key numbers saved to {path.name} in RESULTS_DIR")


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


# --- cleaning executed notebooks -------------------------------------------------------------
# A progress bar's frames (tqdm: "45%|####5     | 61/134 [00:00<00:00, 607.66it/s]").
PROGRESS_RE = re.compile(r"\d+%\||\d+/\d+ \[[\d:<?]+|[\d.]+(?:it/s|s/it)\]")
# Absolute paths of a typical machine (checkouts, temp and home folders), for the check.
ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.~<>-])/(?:work|tmp|home|root|Users|var/folders|private|mnt|opt|srv)/")
# Things no committed output may show (progress-bar titles, Python warnings).
FORBIDDEN_OUTPUT = ("Loading weights", "Writing model shards", "Warning")
# A float printed with all its digits (0.010000000000000009): round it for reading.
RAW_FLOAT_RE = re.compile(r"\d\.\d{12,}")


def machine_paths() -> list[tuple[str, str]]:
    """(absolute path of this machine, what replaces it in a saved output), most specific first:
    the checkout (``<repo>``), the temp folder (``<tmp>``) and the home folder (``~``)."""
    pairs: dict[str, str] = {}
    for path, name in ((REPO_DIR, "<repo>"), (Path(tempfile.gettempdir()), "<tmp>"), (Path.home(), "~")):
        for variant in {str(path), os.path.realpath(path)}:
            if len(variant) > 1:
                pairs.setdefault(variant.rstrip("/"), name)
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def scrub_paths(text: str) -> str:
    """``text`` with this machine's absolute paths replaced (see :func:`machine_paths`)."""
    for path, name in machine_paths():
        text = re.sub(re.escape(path) + r"(?=[/\s'\"),:;\]]|$)", name, text)
    return text


def _is_progress_output(out) -> bool:
    if out.get("output_type") == "stream":
        return out.get("name") == "stderr" and bool(PROGRESS_RE.search(out.get("text", "")))
    data = out.get("data") or {}
    text = data.get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else text
    return "application/vnd.jupyter.widget-view+json" in data and bool(PROGRESS_RE.search(text))


def strip_volatile(path: Path) -> None:
    """Remove what differs between runs or machines from an executed notebook.

    Execution timestamps and papermill timings, widget state, progress bars (stderr streams
    and tqdm widgets: animation frames), and this machine's absolute paths in text outputs
    (replaced by ``<repo>``, ``<tmp>``, ``~``). The sources print neither paths nor progress
    bars; this is the safety net that keeps a committed notebook clean when one slips in.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    # The cell papermill injects holds this machine's absolute paths; the parameters cell
    # above it already shows the values a full run uses.
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.metadata.pop("widgets", None)
    for key in ("start_time", "end_time", "duration", "input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    for key in ("parameters", "environment_variables"):
        nb.metadata.get("papermill", {}).pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        pm_meta = cell.metadata.get("papermill")
        if pm_meta is not None:
            for key in ("start_time", "end_time", "duration"):
                pm_meta.pop(key, None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if _is_progress_output(out):
                continue
            if out.get("output_type") == "stream":
                out["text"] = scrub_paths(out.get("text", ""))
            data = out.get("data")
            if data is not None:
                # Widget views refer to state that is not saved; keep their text fallback only.
                data.pop("application/vnd.jupyter.widget-view+json", None)
                for mime in ("text/plain", "text/html", "text/markdown"):
                    if mime in data:
                        value = data[mime]
                        data[mime] = scrub_paths("".join(value) if isinstance(value, list) else value)
            if out.get("output_type") == "error":
                out["traceback"] = [scrub_paths(line) for line in out.get("traceback", [])]
            kept.append(out)
        cell.outputs = kept
    nbformat.write(nb, str(path))


# --- the structure every numbered notebook keeps ---------------------------------------------
def _text(out) -> str:
    if out.get("output_type") == "stream":
        return out.get("text", "")
    if out.get("output_type") == "error":
        return "\n".join(out.get("traceback", []))
    data = out.get("data") or {}
    parts = []
    for mime in ("text/plain", "text/html", "text/markdown"):
        value = data.get(mime, "")
        parts.append("".join(value) if isinstance(value, list) else value)
    return "\n".join(parts)


def output_problems(path: Path) -> list[str]:
    """What a committed notebook's outputs must not show: progress bars, warnings, absolute
    paths of a machine, raw floats with all their digits, errors."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = _text(out)
            where = f"{path.name} cell {i}"
            if out.get("output_type") == "error":
                problems.append(f"{where}: an error output")
            for word in FORBIDDEN_OUTPUT:
                if word in text:
                    problems.append(f"{where}: output shows {word!r}")
            if _is_progress_output(out) or (out.get("output_type") == "stream" and PROGRESS_RE.search(text)):
                problems.append(f"{where}: a progress bar")
            match = ABSOLUTE_PATH_RE.search(text) or next(
                (re.search(re.escape(p), text) for p, _ in machine_paths() if p in text), None)
            if match:
                problems.append(f"{where}: an absolute path ({text[match.start():match.start() + 40]!r})")
            match = RAW_FLOAT_RE.search(text)
            if match:
                problems.append(f"{where}: a float with all its digits ({match.group()!r}): round it")
    return problems


# Words no notebook may use: the name of an internal notes file, a sibling checkout's folder,
# branches, issue numbers, and "the" + "seed" meaning the original document (docs/background.md
# calls it "the original system"). Spelled in pieces so that a search of the repository for
# these words finds only the notebooks that break the rule.
_NOTES = "DESIGN" + ".md"
_SEED = "the " + "seed"
FORBIDDEN_SOURCE = (
    (re.compile(re.escape(_NOTES)), _NOTES),
    (re.compile(re.escape("../" + "shared")), "../" + "shared"),
    (re.compile(r"\bexperiment" + "/"), "an experiment" + "/ branch"),
    (re.compile(r"\bbranch(es)?\b", re.I), "a branch"),
    (re.compile(r"\bissue\s*#?\d+", re.I), "an issue number"),
    (re.compile(r"\b" + _SEED + r"\b", re.I), f"'{_SEED}' (say 'the original system')"),
)
HEADING_RE = re.compile(r"^#{1,3} +(.*)$", re.M)


def notebook_problems(path: Path) -> list[str]:
    """What a numbered notebook lacks of the tutorial's structure, plus :func:`output_problems`.

    An ``NN · Title`` H1 in its first cell; a "You will learn" cell in its first three; a
    link to ``docs/glossary.md``; a "Summary" and an "Exercises" heading in its last five
    cells; a markdown cell directly after every cell whose output is a figure; none of the
    words of ``FORBIDDEN_SOURCE``.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    problems = []
    number = path.name[:2]
    first = cells[0].source if cells and cells[0].cell_type == "markdown" else ""
    if not re.match(rf"# {re.escape(number)} · \S", first):
        problems.append(f"{path.name}: the first cell is not a '# {number} · Title' heading")
    if not any(c.cell_type == "markdown" and "you will learn" in c.source.lower() for c in cells[:3]):
        problems.append(f"{path.name}: no 'You will learn' cell among the first three")
    if not any(c.cell_type == "markdown" and "glossary.md" in c.source for c in cells):
        problems.append(f"{path.name}: no link to docs/glossary.md")
    for word in ("Summary", "Exercises"):
        if not any(c.cell_type == "markdown" and any(word in h for h in HEADING_RE.findall(c.source)) for c in cells[-5:]):
            problems.append(f"{path.name}: no '{word}' heading in the last five cells")
    for i, cell in enumerate(cells):
        figure = cell.cell_type == "code" and any("image/png" in (o.get("data") or {}) for o in cell.get("outputs", []))
        if figure and (i + 1 >= len(cells) or cells[i + 1].cell_type != "markdown"):
            problems.append(f"{path.name}: cell {i} shows a figure but no markdown cell follows it")
    problems += source_problems(path)
    return problems + output_problems(path)


def source_problems(path: Path) -> list[str]:
    """The words of ``FORBIDDEN_SOURCE`` in any cell of a notebook."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        for pattern, what in FORBIDDEN_SOURCE:
            if pattern.search(cell.source):
                problems.append(f"{path.name} cell {i}: mentions {what}")
    return problems


def run_tutorial(smoke: bool = False) -> dict[str, float]:
    """Execute every numbered notebook in order, then ``solutions.ipynb`` (in place unless ``smoke``);
    print where the results are."""
    import tempfile

    results_dir = NOTEBOOK_DIR / "results"
    out_dir = NOTEBOOK_DIR
    if smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="knoblib-smoke-"))
        results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    # The numbered notebooks in order, then the exercises' solutions (they use what the notebooks teach).
    for nb in [*notebooks(), *([SOLUTIONS] if SOLUTIONS.is_file() else [])]:
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
