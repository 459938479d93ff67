"""Every notebook end to end on every family's tiny replica (``keep="all"``, smoke size), as issue 21 asks: the real
notebooks, parameters injected by papermill, executed by nbclient in one shared kernel (tests/shared_kernel.py) on a
background thread that tests/test_families.py starts, so they run while other tests do.

The notebooks are found by glob and take the parameters they declare from one set (:func:`notebook_parameters`); a
new notebook needs no line here unless it writes a figure no other does (then a line in
:data:`mmflow.figures.NOTEBOOK_FIGURES`, which every notebook must have anyway)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from shared_kernel import NOTEBOOKS as NOTEBOOK_DIR

import mmflow_utils as mu
from mmflow.families import FAMILIES
from mmflow.replicas import REPLICAS, replica

#: The notebooks, in order (the overview reads the CSVs of the others from the same out_dir).
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9]*_*.ipynb"))


def engine_for(family: str) -> str:
    """The engine the notebooks must run with: "naive" where the family refuses the fast one (Gemma 3's
    ``fast_refusal``); that is the only family-specific parameter."""
    refused = next(f for f in FAMILIES if f.name == family).fast_refusal
    return "naive" if refused else "fast"


def notebook_parameters(folder: Path, root: Path, family: str) -> dict:
    """One set of parameters for every notebook (each takes those it declares): the replica, smoke size, every
    example kept (a random replica answers few correctly), the engine the family allows."""
    return {
        "model": str(folder),
        "models": [str(folder)],
        "smoke": True,
        "keep": "all",
        "engine": engine_for(family),
        "out_dir": str(root / "figures"),
        "cache_dir": str(root / "results"),
    }


def notebook_jobs(replica_dir, tmp_path_factory) -> dict[str, list]:
    """Per family: its folder's notebooks in order, each (name, executed notebook path, parameters)."""
    jobs = {}
    for row in REPLICAS:
        root = tmp_path_factory.mktemp(f"notebooks-{row.family}")
        parameters = notebook_parameters(replica_dir(row.family), root, row.family)
        jobs[row.family] = [(name, root / f"{name}.ipynb", parameters) for name in NOTEBOOKS]
    return jobs


def check_figures(out: Path, name: str, n_layers: int) -> None:
    """What notebook ``name`` must have written to ``out``: each figure's PNG, PDF and CSV; a CSV with layers has
    every layer of the replica; an analysis's accounting keeps all 12 smoke examples; its manifest entry names the
    replica's layers and inputs."""
    manifest = json.loads((out / "manifest.json").read_text())
    for figure in mu.NOTEBOOK_FIGURES[name]:
        for suffix in (".png", ".pdf", ".csv"):
            assert (out / f"{figure}{suffix}").stat().st_size > 0, (figure, suffix)
        table = pd.read_csv(out / f"{figure}.csv")
        assert not table.empty, figure
        if "layer" in table:
            assert set(range(n_layers)) <= set(table.layer) and table.layer.max() == n_layers - 1, figure
        if "mean" in table:
            assert table["mean"].notna().all(), figure
        accounting = out / f"{figure}_examples.csv"
        if figure == mu.across.FIG_ACROSS:  # notebook 6: one accounting and manifest entry per model and analysis
            counts = pd.read_csv(accounting)
            per = counts.groupby(["model", "analysis"])
            assert len(per) == len(mu.ANALYSES) and (per.kept.sum() == 12).all(), figure
            (entry,) = manifest[figure]["models"].values()
            assert entry["n_layers"] == n_layers and entry["inputs"] == "paper" and entry["keep"] == "all", figure
        elif accounting.exists():
            counts = pd.read_csv(accounting)
            assert (counts.kept == counts.examples).all() and counts.kept.sum() == 12, figure  # smoke: 2 per task
            assert manifest[figure]["n_layers"] == n_layers and manifest[figure]["inputs"] == "paper", figure
            assert manifest[figure]["keep"] == "all" and manifest[figure]["examples"] == 12, figure


@pytest.mark.parametrize("family", [row.family for row in REPLICAS])
def test_every_notebook_end_to_end(replica_notebooks, replica_dir, family):
    """All notebooks, in order, on the replica (Gemma 3 with engine="naive": its fast engine is refused); what each
    wrote, the patch flows' curves and the overview's verdicts (12 examples: too few to judge)."""
    replica_notebooks.wait(family)
    jobs = replica_notebooks.jobs[family]
    out = Path(jobs[0][2]["out_dir"])
    for name, executed, _ in jobs:
        assert executed.is_file(), name
        check_figures(out, name, replica(family).kwargs["layers"])
    patches = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}.csv")
    assert set(patches.flow) == set(mu.PATCH_FLOWS) and patches["mean"].abs().max() > 0
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert list(verdicts.columns) == ["analysis", "paper", "this_model", "verdict", "n", "layer", "ci_low", "ci_high"]
    computed = verdicts[verdicts.verdict != "not computed"]
    assert len(verdicts) == 6 and len(computed) and set(computed.verdict) == {"inconclusive"}
    assert (computed.n < mu.findings.MIN_EXAMPLES).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[mu.FIG_OVERVIEW] == {"model": str(replica_dir(family)), "data": "shapes"}
    across = pd.read_csv(out / f"{mu.across.FIG_ACROSS}_verdicts.csv")  # notebook 6 judges as the overview does
    assert across.drop(columns="model").equals(verdicts) and set(across.model) == {str(replica_dir(family))}


def test_notebook_parameters_are_declared_and_data_driven():
    """Every parameter a replica run passes is declared by some notebook (no typo silently dropped), and each
    notebook receives model and out_dir; the loop picks the notebooks up by glob."""
    import papermill as pm

    declared = {name: set(pm.inspect_notebook(NOTEBOOK_DIR / f"{name}.ipynb")) for name in NOTEBOOKS}
    passed = set(notebook_parameters(Path("m"), Path("r"), "gemma3"))
    assert passed <= set().union(*declared.values())
    assert all(({"model", "out_dir"} <= names) or ({"models", "out_dir"} <= names) for names in declared.values())
    assert sorted(mu.NOTEBOOK_FIGURES) == NOTEBOOKS
    assert engine_for("gemma3") == "naive" and engine_for("qwen2-vl") == "fast"


def test_the_shared_kernel_injects_parameters_and_forgets_between_notebooks(tmp_path):
    """A notebook gets the parameters it declares (the others dropped), and cannot read what an earlier notebook
    left in the kernel; a failing cell is raised with its error."""
    import nbformat
    from nbclient.exceptions import CellExecutionError
    from shared_kernel import SharedKernel

    def notebook(path: Path, *sources: str) -> Path:
        cells = [nbformat.v4.new_code_cell(sources[0], metadata={"tags": ["parameters"]})]
        cells += [nbformat.v4.new_code_cell(source) for source in sources[1:]]
        kernel = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=kernel), path)
        return path

    first = notebook(tmp_path / "a.ipynb", "x = 0", "left = x + 1")
    second = notebook(tmp_path / "b.ipynb", "y = 0", "assert y == 5 and 'left' not in dir() and 'x' not in dir()")
    kernel = SharedKernel(timeout=60)
    try:
        kernel.run(first, tmp_path / "a_out.ipynb", x=41, unknown=1)
        injected = nbformat.read(tmp_path / "a_out.ipynb", as_version=4).cells[2].source
        assert "x = 41" in injected and "unknown" not in injected
        kernel.run(second, tmp_path / "b_out.ipynb", y=5)
        with pytest.raises(CellExecutionError, match="AssertionError"):
            kernel.run(second, tmp_path / "c_out.ipynb", y=6)
    finally:
        kernel.shutdown()
