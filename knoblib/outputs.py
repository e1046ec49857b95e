"""Where commands write, and the one check that keeps them from replacing anything by surprise.

Every ``python -m knoblib`` command writes under ``runs/`` (relative to the working
directory) unless told otherwise. Writing into the package's ``data/`` folder (the shipped
artifacts) or over an existing output needs an explicit path and ``--overwrite``;
``check_output`` says so before any long work starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .data import data_path

RUNS_DIR = Path("runs")


def runs_path(*parts: str) -> Path:
    """The default output ``runs/<parts>``, relative to the working directory."""
    return RUNS_DIR.joinpath(*parts)


def is_in_data(path: str | Path) -> bool:
    """Whether ``path`` lies inside the package's ``data/`` folder (the shipped artifacts)."""
    return Path(path).resolve().is_relative_to(data_path().resolve())


def check_output(path: str | Path, overwrite: bool, what: str, kind: str = "file", existing_ok: bool = False) -> Path:
    """Refuse an output that would replace something unasked; return it as a ``Path``.

    Args:
        path: where the command will write (a file or a folder).
        overwrite: the command's ``--overwrite`` flag.
        what: the option named in errors (e.g. ``"--out"``).
        kind: ``"file"`` or ``"dir"``, what the command writes at ``path``.
        existing_ok: an existing folder is expected (``train --resume`` continues its run);
            ``data/`` still needs ``overwrite``.

    Raises:
        ValueError: ``path`` is ``data/`` itself or a folder holding it (never replaced
            by a command), is the other kind (a folder where a file goes or the
            reverse), or lies in ``data/`` without ``overwrite``.
        FileExistsError: ``path`` is an existing file or non-empty folder and neither
            ``overwrite`` nor ``existing_ok`` is given.

    Nothing is created or changed: call it first, before any long work.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind={kind!r} is invalid: allowed 'file' or 'dir'")
    path = Path(path)
    resolved, data = path.resolve(), data_path().resolve()
    if data.is_relative_to(resolved):
        raise ValueError(f"{what} {path} is the package's data folder {data} or holds it: write into a folder inside it or elsewhere")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{what} {path} is a folder: expected a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file: expected a folder")
    if resolved.is_relative_to(data) and not overwrite:
        raise ValueError(
            f"{what} {path} is inside the shipped data folder {data}: pass --overwrite to replace what is there "
            f"(default outputs go to {RUNS_DIR}/)"
        )
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not (overwrite or existing_ok):
        raise FileExistsError(f"{what} {path} already exists: pass --overwrite to replace it, or choose another path")
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing any folder there.

    ``new`` must be a sibling of ``target`` (``os.replace`` is atomic within one
    filesystem): the old folder is moved aside first and removed only once the new one
    is in place, so a crash leaves either the old or the new folder, never half of one.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def staging_dir(target: Path) -> Path:
    """A fresh empty folder next to ``target`` to build it in (then ``replace_dir``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
