"""Every notebook runs headlessly with its smoke parameters, and the widget callbacks work without a browser."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import matplotlib
import pandas as pd
import papermill as pm
import pytest

import mmflow_utils as mu
from mmflow.report import PROGRESS_BAR
from mmflow.styles import tick_values

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIGURES = mu.NOTEBOOK_FIGURES


def execute(name: str, out: Path, **parameters) -> None:
    """Run a notebook with the parameters it declares (as ``make reproduce`` does)."""
    declared = pm.inspect_notebook(NOTEBOOKS / f"{name}.ipynb")
    parameters = {k: v for k, v in parameters.items() if k in declared}
    pm.execute_notebook(
        NOTEBOOKS / f"{name}.ipynb",
        out,
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        parameters=parameters,
    )


def make_reproduce_one(name: str, executed: Path, cache_dir: Path, out_dir: Path):
    """What make reproduce runs for one notebook, with N=1; returns the finished process (stderr captured)."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "mmflow.execute",
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(executed),
        "--n",
        "1",
        "--out-dir",
        str(out_dir),
        "--cache-dir",
        str(cache_dir),
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True)


def test_notebooks_and_figures_are_one_list():
    """Every notebook source is in the figure map and notebook N writes figN_* (the Makefile globs the same folder)."""
    sources = sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*_*.ipynb"))
    assert sources == sorted(FIGURES)
    for name, figures in FIGURES.items():
        assert all(f.startswith(f"fig{name.split('_')[0]}_") for f in figures), name


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run all notebooks in order (the overview reads the others' CSVs) into one temporary output folder."""
    root = tmp_path_factory.mktemp("notebooks")
    for name in FIGURES:
        execute(
            name, root / f"{name}.ipynb", smoke=True, out_dir=str(root / "figures"), cache_dir=str(root / "results")
        )
    return root


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_writes_its_figures(executed, name):
    for figure in FIGURES[name]:
        for suffix in (".png", ".pdf", ".csv"):
            assert (executed / "figures" / f"{figure}{suffix}").stat().st_size > 0
        assert not pd.read_csv(executed / "figures" / f"{figure}.csv").empty
    # what a reader sees: no progress bar (transformers' "Loading weights"), no cell's return value of paths
    book = json.loads((executed / f"{name}.ipynb").read_text())
    outputs = [o for c in book["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    texts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert not [t for t in texts if "Loading weights" in t or "PosixPath(" in t]  # (mmflow's own bar: see below)


def test_rerun_gives_identical_csvs(executed, tmp_path):
    """A second run from scratch (fresh result cache) writes byte-identical CSVs."""
    out = {"out_dir": str(tmp_path / "figures"), "cache_dir": str(tmp_path / "results")}
    execute("2_image_to_question", tmp_path / "again.ipynb", smoke=True, **out)
    name = "fig2_image_to_question.csv"
    assert (tmp_path / "figures" / name).read_bytes() == (executed / "figures" / name).read_bytes()


def test_notebooks_have_plain_parameters_cells():
    import nbformat

    for name in FIGURES:
        book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1
        body = ast.parse(tagged[0].source).body
        assert all(isinstance(n, ast.Assign) for n in body)
        for node in body:
            ast.literal_eval(node.value)  # raises unless the value is a plain literal
        names = [n.targets[0].id for n in body]
        # papermill's own inspection (``papermill --help-notebook``) lists every parameter, with its literal default
        inspected = pm.inspect_notebook(NOTEBOOKS / f"{name}.ipynb")
        assert list(inspected) == names, f"{name}: papermill cannot parse some parameter lines"
        assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "sources are stored clean"


def test_failing_notebook_names_the_cell(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r'(?s)Exception encountered at "In \[\d+\]".*tasks must be'):
        execute("2_image_to_question", tmp_path / "out.ipynb", smoke=True, tasks=["CountObj"], out_dir=str(tmp_path))


def test_overview_writes_computed_verdicts(executed):
    verdicts = pd.read_csv(executed / "figures" / "verdicts.csv")
    assert list(verdicts.columns) == ["analysis", "paper", "this_model", "verdict", "n", "layer", "ci_low", "ci_high"]
    # a smoke run (2 examples per task) is too small to judge: every computed verdict says so, with its n and band
    computed = verdicts[verdicts.verdict != "not computed"]
    assert len(verdicts) == 6 and len(computed) and set(computed.verdict) == {"inconclusive"}
    assert (computed.n < mu.findings.MIN_EXAMPLES).all() and (computed.ci_low <= computed.ci_high).all()
    manifest = json.loads((executed / "figures" / "manifest.json").read_text())
    assert manifest[mu.FIG_OVERVIEW] == {"model": "shapes-llava", "data": "shapes"}
    per_figure = {entry["examples"] for entry in manifest.values() if "examples" in entry}
    per_model = {e["examples"] for entry in manifest.values() for e in entry.get("models", {}).values()}  # nb 6
    assert per_figure == {12} and per_model == {12}


def test_explorer_callbacks_without_browser(tmp_path):
    run = mu.Run.load(mu.EMBEDDED_MODEL, cache_dir=str(tmp_path))
    examples = mu.load_examples(n=1, tasks=["ChooseAttr", "QueryAttr"])
    explorer = mu.KnockoutExplorer(run, examples, list(mu.TO_LAST_FLOWS), window=3)
    explorer.update()
    assert set(explorer.result.flow) == {"Question->Last"} and len(explorer.result) == mu.num_layers(run.model)
    explorer.window.value = 1  # a slider move re-runs the knockout
    assert (explorer.result.window_start == explorer.result.window_end).all()
    explorer.layers.value = (2, 4)
    assert explorer.result.layer.tolist() == [2, 3, 4]
    explorer.flow.value = "Image->Last"
    assert set(explorer.result.flow) == {"Image->Last"}
    explorer.task.value = "QueryAttr"
    assert explorer.example.options[0][0].startswith(examples[1].example_id)
    assert explorer.result.example_id.iloc[0] == examples[1].example_id
    fig = explorer.draw(examples[1])
    title = f"QueryAttr {examples[1].example_id}: Image->Last, k=1, centre layers 2-4"
    assert len(fig.axes) == 2 and " ".join(fig.axes[1].get_title().split()) == title  # wrapped to fit
    assert explorer.question.value.endswith(f"{examples[1].question} (answer: {examples[1].answer})")
    assert explorer.window.step == 1 and explorer.window.continuous_update is False  # every window, on release
    assert "k=1" in explorer.status.value and "computing" not in explorer.status.value
    curve = fig.axes[1].get_lines()[0]  # drawn in the flow's style, as in the figures
    style = mu.STYLES["Image->Last"]
    assert matplotlib.colors.to_hex(curve.get_color()) == style.color and curve.get_marker() == style.marker
    assert all(float(t).is_integer() for t in tick_values(fig.axes[1]))
    lo, hi = fig.axes[1].get_ylim()
    assert hi - lo >= 2.0  # a tiny change does not fill the axis


def test_knockout_explorer_states_window_centres_and_flow_once_and_keeps_an_even_window(tmp_path):
    """With window = 4 from the parameters cell, the explorer starts at k=4 (not 5); with centres 3-7 its status
    and title name the window, the range and the flow exactly once each, and the example layer is inside the range."""
    run = mu.Run.load(mu.EMBEDDED_MODEL, cache_dir=str(tmp_path))
    explorer = mu.KnockoutExplorer(run, mu.load_examples(n=1, tasks=["ChooseAttr"]), list(mu.TO_LAST_FLOWS), window=4)
    assert explorer.window.value == 4
    explorer.layers.value = (3, 7)
    status, title = explorer.status.value, explorer.title(explorer.current)
    for text in (status, title):
        assert text.count("k=4") == 1 and text.count("centre layers 3-7") == 1 and text.count("Question->Last") == 1
    assert "k=4: k=4" not in status and "at l=5:" in status and "2 layer(s) below and 1 above" in status
    assert explorer.result.layer.tolist() == [3, 4, 5, 6, 7] and set(explorer.result.k) == {4}


def test_explorers_read_the_analysis_rows_and_compute_only_what_they_lack(tmp_path):
    """Seeded with an analysis' rows, the explorers start on an example those rows hold and draw it without
    running the model (counted by the run's hooks); another setting runs it, and gives the rows' numbers."""
    run = mu.Run.load(mu.EMBEDDED_MODEL, cache_dir=str(tmp_path))
    examples = mu.load_examples(n=2, tasks=["ChooseAttr", "QueryAttr"])
    rows, status = run.knockout(examples, mu.TO_LAST_FLOWS, window=3)
    lens_rows, _ = run.lens(examples)
    kept = status[status.correct].example_id.tolist()
    assert kept
    before = dict(run.computed)
    explorer = mu.KnockoutExplorer(run, examples, list(mu.TO_LAST_FLOWS), window=3, rows=rows)
    seeded = explorer.update()
    mu.LensExplorer(run, examples, rows=lens_rows).update()
    assert run.computed == before and explorer.current.example_id == kept[0]
    assert len(seeded) == mu.num_layers(run.model) and set(seeded.flow) == {"Question->Last"}
    explorer.window.value = 1  # not in the rows: computed
    assert run.computed["layer_calls"] > before["layer_calls"]
    explorer.window.value = 3  # computing a held setting afresh gives the same numbers
    fresh = mu.KnockoutExplorer(run, examples, list(mu.TO_LAST_FLOWS), window=3)
    fresh.example.value = explorer.example.value
    assert (fresh.update().rel_change - seeded.rel_change).abs().max() < 1e-3  # pp; flows batched differently
    assert "model forwards: 0" not in run.describe_computed()


def test_lens_explorer_callbacks_without_browser(tmp_path):
    run = mu.Run.load(mu.EMBEDDED_MODEL, cache_dir=str(tmp_path))
    examples = mu.load_examples(n=1, tasks=["ChooseAttr", "QueryAttr"])
    explorer = mu.LensExplorer(run, examples)
    explorer.update()
    assert set(explorer.result.view) == {mu.WITH_NORM} and explorer.result.layer.tolist()[:4] == [0, 0, 0, 0]
    explorer.view.value = "paper"
    assert set(explorer.result.view) == {mu.PAPER_VIEW} and explorer.result.layer.min() == -1
    explorer.layers.value = (2, 4)
    assert sorted(explorer.result.layer.unique()) == [2, 3, 4]
    explorer.task.value = "QueryAttr"
    assert explorer.result.example_id.iloc[0] == examples[1].example_id
    assert set(explorer.result.token) == {"answer (lowercase)", "answer (Capitalized)"}  # no options in QueryAttr
    example = explorer.current
    assert explorer.status.value.count(mu.PAPER_VIEW) == 1 and explorer.title(example).endswith("layers 2-4")
    explorer.layers.value = (-1, 7)
    assert explorer.draw(example).axes[0].get_xlabel() == "layer (-1: embeddings)"
    explorer.view.value = "final_norm"  # no layer -1 in this view: neither in the label nor in the title
    assert explorer.status.value.count(mu.WITH_NORM) == 1 and explorer.title(example).endswith("layers 0-7")
    ax = explorer.draw(example).axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_xlim()[0] > -1
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["answer (Capitalized)"].get_marker() == mu.STYLES["answer (Capitalized)"].marker


def test_make_passes_each_notebook_its_own_parameters_with_absolute_paths(tmp_path, monkeypatch):
    """``make reproduce`` paths are relative to where make runs; a notebook gets only what it declares."""
    import argparse

    from mmflow.execute import notebook_parameters

    (tmp_path / "gqa").mkdir(), (tmp_path / "my-llava").mkdir()
    monkeypatch.chdir(tmp_path)
    given = {
        "source": None,
        "executed": None,
        "model": "./my-llava",
        "data": "gqa",
        "images": "",
        "device": "cpu",
        "dtype": "float32",
        "out_dir": "figs",
        "cache_dir": "res",
        "engine": None,
        "n_per_task": "",
    }
    declared = list(pm.inspect_notebook(NOTEBOOKS / "1_to_last_flow.ipynb"))
    params = notebook_parameters(argparse.Namespace(**given), declared)
    assert params["model"] == str(tmp_path / "my-llava") and params["data"] == str(tmp_path / "gqa")
    assert params["out_dir"] == str(tmp_path / "figs") and "engine" not in params
    assert "n_per_task" not in params and "images" not in params  # empty: the notebook's default (None, "")
    zero = notebook_parameters(argparse.Namespace(**{**given, "n_per_task": "0"}), declared)
    assert zero["n_per_task"] is None
    executed = tmp_path / "notebooks" / "executed"  # the executed copy's folder: paths are written relative to it
    relative = notebook_parameters(argparse.Namespace(**given), declared, relative_to=executed)
    assert (
        relative["out_dir"] == "../../figs"
        and relative["model"] == "../../my-llava"
        and relative["data"] == "../../gqa"
    )
    assert notebook_parameters(argparse.Namespace(**{**given, "data": "shapes"}), declared)["data"] == "shapes"
    overview = notebook_parameters(
        argparse.Namespace(**given), list(pm.inspect_notebook(NOTEBOOKS / "5_overview.ipynb"))
    )
    assert set(overview) == {"model", "data", "out_dir"}
    hub = notebook_parameters(
        argparse.Namespace(**{**given, "model": "llava-hf/llava-1.5-7b-hf", "n_per_task": "7"}), declared
    )
    assert hub["model"] == "llava-hf/llava-1.5-7b-hf" and hub["n_per_task"] == 7
    with pytest.raises(mu.MmflowError, match="N \\(questions per task\\) must be a non-negative integer"):
        notebook_parameters(argparse.Namespace(**{**given, "n_per_task": "abc"}), declared)
    # notebook 6: MODELS (whitespace-separated, folders placed like MODEL); else MODEL alone unless it is the default
    across = list(pm.inspect_notebook(NOTEBOOKS / "6_across_models.ipynb"))
    both = {**given, "models": "llava-hf/llava-1.5-7b-hf  ./my-llava"}
    assert notebook_parameters(argparse.Namespace(**both), across)["models"] == [
        "llava-hf/llava-1.5-7b-hf",
        str(tmp_path / "my-llava"),
    ]
    assert notebook_parameters(argparse.Namespace(**{**given, "models": ""}), across)["models"] == [
        str(tmp_path / "my-llava")
    ]
    default = notebook_parameters(argparse.Namespace(**{**given, "model": "shapes-llava", "models": " "}), across)
    assert "models" not in default and "model" not in default  # the notebook's own list: both embedded models
    assert "models" not in notebook_parameters(argparse.Namespace(**both), declared)  # notebooks 1-5 do not take it


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"tasks": []}, "tasks must be"),
        ({"tasks": "ChooseAttr"}, "tasks must be"),
        ({"n_per_task": 0}, "n_per_task must"),
        ({"n_per_task": "abc"}, "n_per_task must"),
        ({"window": 0}, "window must"),
        ({"window": -1}, "window must"),
        ({"engine": "turbo"}, "engine must"),
        ({"dtype": "bogus"}, "dtype must"),
    ],
)
def test_study_names_a_bad_parameter(bad, message):
    with pytest.raises(mu.MmflowError, match=message):
        mu.Study.from_params(**bad)


def test_a_fresh_default_run_reproduces_the_committed_figures(tmp_path):
    """All notebooks with their default parameters, a fresh cache and an empty out_dir: every figure's data equals
    the committed CSV within the stated tolerance (floating-point order differs across machines)."""
    from mmflow.figures import CSV_ATOL, CSV_RTOL

    out = tmp_path / "figures"
    for name in FIGURES:
        execute(name, tmp_path / f"{name}.ipynb", out_dir=str(out), cache_dir=str(tmp_path / "results"))
    committed = NOTEBOOKS.parent / "figures"
    for figure in [f for figures in FIGURES.values() for f in figures]:
        fresh, saved = pd.read_csv(out / f"{figure}.csv"), pd.read_csv(committed / f"{figure}.csv")
        pd.testing.assert_frame_equal(fresh, saved, check_exact=False, rtol=CSV_RTOL, atol=CSV_ATOL, obj=figure)
    assert (out / "verdicts.csv").read_text() == (committed / "verdicts.csv").read_text()
    assert (out / "manifest.json").read_text() == (committed / "manifest.json").read_text()
    share_results(tmp_path / "results", NOTEBOOKS.parent / "results")


def share_results(fresh: Path, default: Path) -> None:
    """Add the fresh run's cached results to the default cache (``results/``, what ``make reproduce`` and the
    executed notebooks use), so ``make test``'s nbval stage, which re-executes the committed notebooks with their
    default parameters, reads them instead of computing the default run a second time. Only result files that the
    default cache lacks are copied: entries are keyed by content, so an existing one holds the same result."""
    import shutil

    for path in fresh.glob("*-*/*.json"):  # <analysis>-<key>/<example digest>.json
        target = default / path.relative_to(fresh)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def test_report_is_offline_with_every_notebook(executed, tmp_path):
    from mmflow.report import build_report

    index = build_report(executed, tmp_path / "report")
    links = re.findall(r'href="([^"]+\.html)"', index.read_text())
    assert links == [f"{name}.html" for name in FIGURES]
    for link in links:
        page = (tmp_path / "report" / link).read_text()
        assert "data:image/png;base64," in page  # figures inline
        assert not re.search(r"<script[^>]*src=\"https?:", page) and "cdnjs" not in page  # nothing from the internet
        assert "import mmflow_utils as mu" not in page  # code hidden
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        assert re.match(r"\d\. ", title) and '<a href="index.html">' in page  # the notebook's title, a way back
        assert '<table class="parameters">' in page and "The cell below" not in page and not PROGRESS_BAR.search(page)


def test_make_reproduce_shows_progress_in_the_terminal_not_in_the_notebook(tmp_path):
    out = tmp_path / "nb.ipynb"
    done = make_reproduce_one("2_image_to_question", out, tmp_path / "results", tmp_path / "figures")
    assert "knockout:" in done.stderr and "/6 [" in done.stderr  # per-example progress with its counts and ETA
    streams = [o["text"] for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []) if "text" in o]
    assert not any("knockout:" in "".join(text) for text in streams)


def test_sweep_in_two_processes_equals_one_and_leaves_nothing_to_compute(tmp_path):
    """make sweep NPROC=2 (Accelerate, gloo on CPU) writes byte for byte the cache one process writes; a following
    notebook run computes no example and runs no model forward (it says so in the terminal)."""
    import subprocess
    import sys

    venv = Path(sys.executable).parent
    common = ["-m", "mmflow.sweep", "--n", "1"]
    subprocess.run([sys.executable, *common, "--cache-dir", str(tmp_path / "one")], check=True, capture_output=True)
    subprocess.run(
        [
            str(venv / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *common,
            "--cache-dir",
            str(tmp_path / "two"),
        ],
        check=True,
        capture_output=True,
    )
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.json")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.json")}
    assert len(one) == 6 * (1 + len(mu.ANALYSES)) and one == two  # answers + every analysis, identical bytes
    # notebook 6 compares both embedded models: a sweep of the second one (make sweep MODEL=shapes-qwen) covers it
    subprocess.run(
        [sys.executable, *common, "--model", "shapes-qwen", "--cache-dir", str(tmp_path / "two")],
        check=True,
        capture_output=True,
    )
    # notebooks 1-4 and 6 (the overview reads CSVs only): every analysis of both models comes from the sweeps
    for name in [n for n in FIGURES if not n.endswith("_overview")]:
        done = make_reproduce_one(name, tmp_path / f"{name}.ipynb", tmp_path / "two", tmp_path / "figures")
        assert re.search(r"(knockout|logit lens): 0 of 6 examples computed, 6 from the cache", done.stderr), name
        assert not re.search(r"(knockout|logit lens): [1-9]\d* of \d+ examples computed", done.stderr), name
        # measured by hooks on the model and its decoder layers, over the whole notebook (demo and explorer too)
        models = ["shapes-llava", "shapes-qwen"] if name.endswith("_across_models") else ["shapes-llava"]
        for model in models:
            assert f"{model}: model forwards: 0, decoder-layer calls: 0" in done.stderr, (name, model)
