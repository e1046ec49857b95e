"""Notebook 06's budget explorer in a real browser: JupyterLab + headless Chromium (Playwright).

The test copies the notebook to a temporary folder (smoke mode, results written there),
starts JupyterLab on a free localhost port with every Jupyter directory temporary (only
the venv's kernelspec and lab extensions are read), runs all cells from the Run menu,
then drives the widget with the keyboard: Home and End on the budget slider's handle.
The knobs it shows must be the ones the notebook recorded for the lowest and the
highest budget. No browser is downloaded: Debian's /usr/bin/chromium is used, and the
test skips when it or the ``playwright`` package is missing.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from knoblib.tutorial import NOTEBOOK_DIR
from knoblib.widgets import CSS_CLASSES, parse_knobs

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NOTEBOOK = "06_budget_explorer.ipynb"
TOKEN = "knoblib-browser-test"
SERVER_START_S = 30
RUN_ALL_S = 60  # kernel start + the notebook in smoke mode
UPDATE_S = 20  # one slider move: explain + figure in the kernel, then the page


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _smoke_copy(folder: Path) -> Path:
    """The notebook with its parameters cell set as papermill would: SMOKE on, results in ``folder``."""
    nb = nbformat.read(str(NOTEBOOK_DIR / NOTEBOOK), as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = f'SMOKE = True\nRESULTS_DIR = {str(folder / "results")!r}'
    # Start from a clean notebook: the committed copy carries the outputs of the last full
    # run, which would make the page look finished before the kernel has run anything.
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    path = folder / NOTEBOOK
    nbformat.write(nb, str(path))
    return path


def _kill_kernels(runtime_dir: Path) -> None:
    """Kill leftover kernels of this server: their command line names a file in our runtime dir."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(runtime_dir) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server over a smoke copy of notebook 06; yields (base url, notebook folder)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (pip install playwright)")
    root = tmp_path / "notebooks"
    root.mkdir()
    _smoke_copy(root)
    home = {name: tmp_path / name for name in ("config", "data", "runtime", "ipython")}
    for folder in home.values():
        folder.mkdir()
    # No news feed, no update check (no network here), nothing written outside tmp_path.
    (home["config"] / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    "extension_manager": "readonly",
                }
            }
        )
    )
    # Start the notebook's kernel without asking, and do not ask about the news feed.
    settings = home["config"] / "lab" / "user-settings" / "@jupyterlab"
    for plugin, values in {
        "notebook-extension/tracker": {"autoStartDefaultKernel": True},
        "apputils-extension/notification": {"fetchNews": "false"},
    }.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).with_suffix(".jupyterlab-settings").write_text(json.dumps(values))
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # figures must render
    env.update(
        JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"),
        JUPYTER_CONFIG_DIR=str(home["config"]),
        JUPYTER_DATA_DIR=str(home["data"]),
        JUPYTER_RUNTIME_DIR=str(home["runtime"]),
        IPYTHONDIR=str(home["ipython"]),
        # The models are tiny; one thread avoids spin-waiting when other work shares the CPU
        # (the same reason tests/conftest.py sets torch.set_num_threads(1)).
        OMP_NUM_THREADS="1",
    )
    port = _free_port()
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser",
            f"--IdentityProvider.token={TOKEN}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
            "--ServerApp.terminals_enabled=False",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield base, root
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait(timeout=5)
        _kill_kernels(home["runtime"])  # kernels run in their own session
        log.close()


def _text(page, role: str) -> str:
    return page.locator(f".{CSS_CLASSES[role]}").first.inner_text()


def _wait_for_text(page, role: str, pattern: str, timeout_s: float) -> str:
    """Poll the part's text until ``pattern`` (a regex) matches; return the text."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        locator = page.locator(f".{CSS_CLASSES[role]}")
        if locator.count():
            text = locator.first.inner_text()
            if re.search(pattern, text):
                return text
        page.wait_for_timeout(200)
    raise AssertionError(f"{role!r} never matched {pattern!r}; last text: {text!r}")


def _wait_for_kernel(base: str, page, timeout_s: float) -> None:
    """Wait until the server has an idle kernel (started and ready).

    Should JupyterLab still ask which kernel to start, accept its choice: the notebook's
    own kernelspec, "knoblib".
    """
    deadline = time.monotonic() + timeout_s
    accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    kernels = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/kernels?token={TOKEN}", timeout=5) as reply:
            kernels = json.loads(reply.read())
        if any(k.get("execution_state") == "idle" for k in kernels):
            return
        if accept.count() and accept.first.is_visible():
            accept.first.click()
        page.wait_for_timeout(300)
    raise AssertionError(f"no idle kernel after {timeout_s} s: {kernels}")


def _results(root: Path, timeout_s: float) -> dict:
    path = root / "results" / "06_budget_explorer.json"
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return json.loads(path.read_text())


def test_budget_slider_changes_the_shown_knobs(jupyter_lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, root = jupyter_lab
    start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={TOKEN}")
            page.locator(".jp-NotebookPanel .jp-Notebook").first.wait_for(timeout=SERVER_START_S * 1000)
            _wait_for_kernel(base, page, SERVER_START_S)

            # Run > Run All Cells.
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()

            first = _wait_for_text(page, "knobs", r"knobs: tier=\w+", RUN_ALL_S)
            results = _results(root, 60)
            low, high, mode = results["budget_low_ms"], results["budget_high_ms"], "B"
            details = _text(page, "details")
            # The explorer opens on the featured request, at the budget where it and the table differ.
            assert f"request: {results['featured_uid']} " in details, details
            assert f"budget: {results['featured_budget_ms']:.1f} ms (mode {mode})" in details, details
            print(f"first view: {first!r}")

            # The keyboard moves the slider: Home = the lowest budget, End = the highest.
            handle = page.locator(f".{CSS_CLASSES['budget']} .noUi-handle").first
            handle.focus()
            page.keyboard.press("Home")
            _wait_for_text(page, "details", re.escape(f"budget: {low:.1f} ms"), UPDATE_S)
            at_low = parse_knobs(_text(page, "knobs"))
            answer_low = _text(page, "answer")

            page.keyboard.press("End")
            _wait_for_text(page, "details", re.escape(f"budget: {high:.1f} ms"), UPDATE_S)
            at_high = parse_knobs(_text(page, "knobs"))
            answer_high = _text(page, "answer")
            page.wait_for_timeout(500)  # let the browser paint the new figure
            widget = page.locator(f".{CSS_CLASSES['root']}").first
            widget.scroll_into_view_if_needed()
            shot = tmp_path / "browser_explorer.png"
            widget.screenshot(path=str(shot))
            page.screenshot(path=str(tmp_path / "browser_page.png"))
            print(f"screenshots: {shot} (the widget), {tmp_path / 'browser_page.png'} (the page)")
            print(f"Mode {mode}, lowest budget {low:.1f} ms: {at_low.short()} | {answer_low}")
            print(f"Mode {mode}, highest budget {high:.1f} ms: {at_high.short()} | {answer_high}")

            # What the browser shows is what the notebook computed outside the widget.
            assert at_low.short() == results[f"featured_knobs_low_{mode}"]
            assert at_high.short() == results[f"featured_knobs_high_{mode}"]
            assert re.match(r"answer: \S+.* \((correct|wrong, expected \w+)\)", answer_high), answer_high
            # The figure (a PNG in the Output widget) is on the page.
            assert page.locator(f".{CSS_CLASSES['figure']} img").count() >= 1

            # The "new sample" button draws a fresh request (seed 1000 first).
            page.locator(f".{CSS_CLASSES['new_sample']}").first.click()
            _wait_for_text(page, "details", r"request: 1000-0 ", UPDATE_S)
        finally:
            browser.close()
    print(f"browser part: {time.monotonic() - start:.1f} s")  # reported, not judged: the machine may be slow
