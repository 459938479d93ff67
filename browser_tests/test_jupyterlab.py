"""The JupyterLab workflow in a real browser: JupyterLab (started as ``make lab`` starts it) serves the notebooks
on 127.0.0.1 with a token; headless Chromium runs notebooks 1, 3 and 4, moves their explorers' sliders and
dropdowns, and checks that each figure changes to the new setting (its title text and its image). Update
latencies and before/after screenshots are kept in ``results/browser/``. Run with ``make test-browser``."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import Page, sync_playwright

from mmflow.lab import lab_command

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "results" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIRST = "20250611-{task}-00000"  # the first shapes question of a task
TIMEOUT_MS = 180_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on copies of the notebooks whose parameters ask for a smoke run; stopped afterwards."""
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    root.mkdir()
    for name in ("1_to_last_flow", "3_patch_groups", "4_answer_casing", "6_across_models"):
        book = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
        cell.source += '\nsmoke = True\ntasks = ["ChooseAttr", "QueryAttr"]'
        nbformat.write(book, root / f"{name}.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    log = (tmp_path_factory.getbasetemp() / "lab.log").open("w")
    server = subprocess.Popen(lab_command(str(root), port, token), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not start")
        yield base, token, root
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


LATENCIES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """Keep a screenshot of every open page when a test fails."""
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for i, page in enumerate(OPEN_PAGES):
            if not page.is_closed():
                page.screenshot(path=ARTIFACTS / f"failure_{request.node.name}_{i}.png", full_page=True)


OPEN_PAGES: list[Page] = []


def open_and_run(browser, lab, name: str) -> Page:
    base, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    OPEN_PAGES.append(page)
    page.goto(f"{base}/lab/workspaces/{name}/tree/{name}.ipynb?token={token}&reset")  # one workspace per test
    page.wait_for_selector(".jp-NotebookPanel", timeout=TIMEOUT_MS)
    page.get_by_text("mmflow | Idle").wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    return page


def cell(page: Page):
    """The explorer's cell: the last cell of the notebook in view."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").last


def explorer_status(page: Page):
    return cell(page).locator(".widget-html").nth(1)


def figure_image(page: Page) -> str:
    image = cell(page).locator(".widget-output img").last
    image.wait_for(timeout=TIMEOUT_MS)
    return image.get_attribute("src")


def change(page: Page, name: str, step: str, action, expected: str) -> None:
    """Do ``action``; wait until the explorer's status shows ``expected`` and its figure is a new image."""
    before = figure_image(page)
    page.screenshot(path=ARTIFACTS / f"{name}_{step}_before.png")
    start = time.perf_counter()
    action()
    cell(page).locator(".widget-html", has_text=expected).wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function(
        "([before]) => { const imgs = document.querySelectorAll("
        "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell:last-child .widget-output img');"
        " return imgs.length && imgs[imgs.length - 1].src !== before; }",
        arg=[before],
        timeout=TIMEOUT_MS,
    )
    LATENCIES[f"{name}: {step}"] = round(time.perf_counter() - start, 2)
    page.screenshot(path=ARTIFACTS / f"{name}_{step}_after.png")
    assert expected in explorer_status(page).inner_text()
    assert "computing" not in explorer_status(page).inner_text()


def slider_key(page: Page, label: str, key: str):
    handle = cell(page).locator(f".widget-slider:has(label:text-is('{label}')) .noUi-handle").first
    return lambda: (handle.focus(), handle.press(key))


def select(page: Page, label: str, option: str):
    dropdown = cell(page).locator(f".widget-dropdown:has(label:text-is('{label}')) select")
    return lambda: dropdown.select_option(label=option)


ATTR, QUERY = f"ChooseAttr {FIRST.format(task='ChooseAttr')}", f"QueryAttr {FIRST.format(task='QueryAttr')}"
#: Per notebook: the explorer's first status, then (step, control kind, control label, key or option, new status).
CASES = {
    "1_to_last_flow": (
        f"{ATTR}: Question->Last, k=3",
        [
            ("window", "slider", "window k", "ArrowRight", f"{ATTR}: Question->Last, k=4"),  # even windows too
            ("task", "select", "task", "QueryAttr", f"{QUERY}: Question->Last, k=4"),
        ],
    ),
    "3_patch_groups": (
        f"{ATTR}: Related patches->Question, k=3",
        [
            ("flow", "select", "flow", "Other patches->Question", f"{ATTR}: Other patches->Question, k=3"),
            ("window", "slider", "window k", "ArrowLeft", f"{ATTR}: Other patches->Question, k=2"),
        ],
    ),
    "4_answer_casing": (
        f"{ATTR}: with final norm",
        [
            ("view", "select", "view", "paper's code: hidden_states (top normed)", f"{ATTR}: paper's code"),
            ("task", "select", "task", "QueryAttr", f"{QUERY}: paper's code"),
        ],
    ),
    "6_across_models": (  # the model switch swaps the model, its examples and its window
        f"shapes-llava (L=8): {ATTR}: Other patches->Question, k=3",
        [
            ("model", "select", "model", "shapes-qwen", "shapes-qwen (L=8): "),
            ("flow", "select", "flow", "Question->Last", ": Question->Last, k=3"),
            ("window", "slider", "window k", "ArrowRight", ": Question->Last, k=4"),
            ("back", "select", "model", "shapes-llava", f"shapes-llava (L=8): {ATTR}: Question->Last, k=3"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_explorer_follows_its_controls(browser, lab, name):
    """Run the notebook; each change of a control redraws the figure for the new setting (title text and image)."""
    first, steps = CASES[name]
    page = open_and_run(browser, lab, name)
    explorer_status(page).filter(has_text=first).wait_for(timeout=TIMEOUT_MS)
    # nothing covers the explorer: no "get notified about Jupyter news?" pop-up, no update notice (make lab's settings)
    assert page.locator(".Toastify__toast").count() == 0 and page.get_by_text("Jupyter news").count() == 0
    for step, kind, label, value, expected in steps:
        action = slider_key(page, label, value) if kind == "slider" else select(page, label, value)
        change(page, name, step, action, expected)
    page.close()


def test_saving_in_jupyterlab_keeps_sources_clean(browser, lab):
    """Run and save a notebook: the saved source holds no outputs, and the checkout's notebooks and figures are
    untouched (interactive runs write to ../results/figures)."""
    _, _, root = lab
    original = (root / "1_to_last_flow.ipynb").read_bytes()
    page = open_and_run(browser, lab, "1_to_last_flow")
    explorer_status(page).filter(has_text="k=3").wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("Control+s")
    page.get_by_text("mmflow | Idle").wait_for(timeout=TIMEOUT_MS)
    time.sleep(2)
    saved = nbformat.read(root / "1_to_last_flow.ipynb", as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in saved.cells if c.cell_type == "code")
    assert (root / "1_to_last_flow.ipynb").read_bytes() == original  # byte for byte: git would see no change
    assert (root.parent / "results" / "figures" / "fig1_to_last.png").exists()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "notebooks", "figures"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert dirty == ""
    page.close()


def test_latencies_are_recorded():
    (ARTIFACTS / "latency.json").write_text(json.dumps(LATENCIES, indent=1) + "\n")
    print("update latencies (s):", LATENCIES)
    assert len(LATENCIES) == sum(len(steps) for _, steps in CASES.values())
