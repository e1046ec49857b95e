"""The committed notebooks as a learner meets them: their teaching structure and clean outputs.

Runs on the notebooks as committed (no execution): every numbered notebook has an
``NN · Title``, a "You will learn" cell, a "Summary" and "Exercises" at its end, a reading
after each figure and a link to the glossary; no output shows a progress bar, a warning,
an absolute path of the machine that ran it, or a float with all its digits; no cell
mentions internal notes, branches or the original document by a nickname (``FORBIDDEN_SOURCE``). Also checks the cleaning safety net
(``strip_volatile``) and ``save_results`` on made-up notebooks.
"""

import json

import nbformat
import pytest

from knoblib import tutorial
from knoblib.tutorial import (
    SOLUTIONS,
    machine_paths,
    notebook_problems,
    notebooks,
    output_problems,
    save_results,
    source_problems,
    strip_volatile,
)


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_numbered_notebook_keeps_the_tutorial_structure_and_clean_outputs(path):
    assert notebook_problems(path) == []


def test_every_numbered_notebook_is_there():
    names = [p.name[:2] for p in notebooks()]
    assert names[:7] == ["00", "01", "02", "03", "04", "05", "06"]


def test_solutions_notebook_exists_with_the_parameters_cell_and_clean_outputs():
    assert SOLUTIONS.is_file()
    assert SOLUTIONS not in notebooks()  # executed by tests/test_solutions.py, not as a chapter
    nb = nbformat.read(str(SOLUTIONS), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert 'SMOKE = False' in params[0].source and 'RESULTS_DIR = "results"' in params[0].source
    assert source_problems(SOLUTIONS) == [] and output_problems(SOLUTIONS) == []
    # Every numbered notebook's exercises have a section in the solutions.
    headings = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for path in notebooks():
        assert f"# {path.name[:2]} ·" in headings, path.name


def _notebook(tmp_path, outputs, source="print(1)"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = outputs
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_strip_volatile_drops_progress_bars_and_replaces_machine_paths(tmp_path):
    repo = str(tutorial.REPO_DIR)
    outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="Loading weights:  53%|#####3    | 71/134 [00:00<00:00, 607.66it/s]"),
        nbformat.v4.new_output(
            "display_data",
            data={"text/plain": "GRPO B:   0%|          | 0/100 [00:00<?, ?it/s]",
                  "application/vnd.jupyter.widget-view+json": {"model_id": "x"}},
        ),
        nbformat.v4.new_output("stream", name="stdout", text=f"wrote {repo}/notebooks/results/x.json\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"'{machine_paths()[-1][0]}/cache'"}, execution_count=1),
    ]
    path = _notebook(tmp_path, outputs)
    assert output_problems(path)  # the raw notebook is not clean
    strip_volatile(path)
    cell = nbformat.read(str(path), as_version=4).cells[0]
    assert len(cell.outputs) == 2  # both progress bars gone
    assert cell.outputs[0]["text"] == "wrote <repo>/notebooks/results/x.json\n"
    assert repo not in json.dumps(cell.outputs)
    assert output_problems(path) == []


def test_output_problems_name_warnings_paths_and_raw_floats(tmp_path):
    outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: Converting a tensor\n"),
        nbformat.v4.new_output("stream", name="stdout", text="runs go to /tmp/knoblib-nb05-x\n"),
        nbformat.v4.new_output("stream", name="stdout", text="[0.947, 0.010000000000000009]\n"),
    ]
    problems = "\n".join(output_problems(_notebook(tmp_path, outputs)))
    assert "'Warning'" in problems and "absolute path" in problems and "all its digits" in problems


def test_source_problems_name_internal_words(tmp_path):
    from knoblib.tutorial import _NOTES, _SEED

    path = _notebook(tmp_path, [], source=f"# {_NOTES} section 2 says {_SEED}'s partial forward")
    problems = "\n".join(source_problems(path))
    assert _NOTES in problems and _SEED in problems


def test_save_results_writes_plain_json_and_prints_no_path(tmp_path, capsys):
    import torch

    from knoblib.knobs import KnobConfig

    save_results({"a": torch.tensor(0.5), "b": KnobConfig("high", 1, 2, 8), "c": [torch.tensor([1, 2])]},
                 "nb", tmp_path / "results")
    assert json.loads((tmp_path / "results" / "nb.json").read_text()) == {"a": 0.5, "b": "high/p1/k2/b8", "c": [[1, 2]]}
    printed = capsys.readouterr().out
    assert "3 key numbers" in printed and str(tmp_path) not in printed
