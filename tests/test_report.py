"""The report renders executed notebooks as they are: titled pages linking back to the index, the parameters used as
a table, no progress bars, no code; ``make report`` runs nothing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nbformat

from mmflow.report import build_report

ROOT = Path(__file__).resolve().parent.parent


def executed_notebook(path: Path) -> None:
    """A small executed notebook as papermill writes one: a title, the parameters cell and papermill's injected
    cell, a stuck progress bar (text-only display and stderr), and a result."""
    bar = "Loading weights:   0%|          | 0/117 [00:00<?, ?it/s]"
    code = nbformat.v4.new_code_cell(
        "study = load()",
        outputs=[
            nbformat.v4.new_output("display_data", data={"text/plain": bar}),
            nbformat.v4.new_output("stream", name="stderr", text=bar + "\n"),
            nbformat.v4.new_output("stream", name="stdout", text="kept: 12\n"),
        ],
    )
    cells = [
        nbformat.v4.new_markdown_cell("# 1. Information flow to the last position\n\nWhere does it read from?"),
        nbformat.v4.new_code_cell(
            'model = "shapes-llava"  # the model\nn_per_task = None', metadata={"tags": ["parameters"]}
        ),
        nbformat.v4.new_code_cell("# Parameters\nn_per_task = 2\n", metadata={"tags": ["injected-parameters"]}),
        code,
    ]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def test_pages_are_titled_link_back_show_the_parameters_used_and_no_progress_bars(tmp_path):
    executed = tmp_path / "executed"
    executed.mkdir()
    executed_notebook(executed / "1_to_last_flow.ipynb")
    build_report(executed, tmp_path / "report")
    page = (tmp_path / "report" / "1_to_last_flow.html").read_text()
    assert re.search(r"<title>1\. Information flow to the last position</title>", page)
    assert '<a href="index.html">' in page
    table = re.search(r'<table class="parameters">.*?</table>', page, flags=re.S).group(0)
    assert "<code>n_per_task</code></td><td><code>2</code>" in table  # the value papermill injected, not None
    assert "&#x27;shapes-llava&#x27;" in table or "'shapes-llava'" in table
    assert "Loading weights" not in page and "kept: 12" in page and "study = load()" not in page


def test_make_report_runs_no_notebook():
    """The report target depends on the venv only, not on the executed notebooks' rules (make -n shows no run)."""
    rule = re.search(r"^report:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert "$(RUNS)" not in rule.split("##")[0]
    dry = subprocess.run(
        ["make", "-n", "-W", "notebooks/1_to_last_flow.ipynb", "report"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mmflow.execute" not in dry.stdout and "mmflow.report" in dry.stdout
