"""Every notebook runs headlessly with its smoke parameters, and the widget callbacks work without a browser."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

import mmflow_utils as mu

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIGURES = {
    "1_to_last_flow": ["fig1_to_last"],
    "2_image_to_question": ["fig2_image_to_question"],
    "3_patch_groups": ["fig3_patch_groups", "fig3_patch_groups_example"],
    "4_answer_casing": ["fig4_answer_casing", "fig4_answer_casing_per_task"],
    "5_overview": ["fig0_overview"],
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run all notebooks in order (the overview reads the others' CSVs) into one temporary output folder."""
    root = tmp_path_factory.mktemp("notebooks")
    for name in FIGURES:
        pm.execute_notebook(NOTEBOOKS / f"{name}.ipynb", root / f"{name}.ipynb", kernel_name="python3",
                            cwd=str(NOTEBOOKS), progress_bar=False,
                            parameters={"smoke": True, "out_dir": str(root / "figures"), "cache_dir": str(root / "results")})
    return root


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_writes_its_figures(executed, name):
    for figure in FIGURES[name]:
        for suffix in (".png", ".pdf", ".csv"):
            assert (executed / "figures" / f"{figure}{suffix}").stat().st_size > 0
        assert not pd.read_csv(executed / "figures" / f"{figure}.csv").empty


def test_rerun_gives_identical_csvs(executed, tmp_path):
    """A second run from scratch (fresh result cache) writes byte-identical CSVs."""
    pm.execute_notebook(NOTEBOOKS / "2_image_to_question.ipynb", tmp_path / "again.ipynb", kernel_name="python3",
                        cwd=str(NOTEBOOKS), progress_bar=False,
                        parameters={"smoke": True, "out_dir": str(tmp_path / "figures"), "cache_dir": str(tmp_path / "results")})
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
    with pytest.raises(pm.PapermillExecutionError, match=r'(?s)Exception encountered at "In \[\d+\]".*Unknown task'):
        pm.execute_notebook(NOTEBOOKS / "2_image_to_question.ipynb", tmp_path / "out.ipynb", kernel_name="python3",
                            cwd=str(NOTEBOOKS), progress_bar=False,
                            parameters={"smoke": True, "tasks": ["CountObj"], "out_dir": str(tmp_path)})


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
    fig = explorer.figure(examples[1])
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "Image->Last, k=1"
