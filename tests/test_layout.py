"""The house rules of the package: a thin facade, modules of one concern, no import cycle between files."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import mmflow_utils as mu

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mmflow"


def mmflow_imports(path: Path) -> set[str]:
    """The mmflow modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmflow":
            if node.module == "mmflow":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mmflow.")}
    return found


def test_no_import_cycle_between_modules():
    graph = {p.stem: mmflow_imports(p) - {p.stem} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {err.args[1]}") from err
    assert order.index("paper") < order.index("models") < order.index("engines") < order.index("study")
    assert graph["paper"] <= {"errors"} and graph["errors"] == set()


def test_modules_stay_small_and_the_facade_thin():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 420, path.name
    facade = ast.parse((ROOT / "mmflow_utils.py").read_text())
    assert len((ROOT / "mmflow_utils.py").read_text().splitlines()) <= 110
    assert not [n for n in facade.body if isinstance(n, ast.FunctionDef | ast.ClassDef)], "the facade only re-exports"
    assert all(hasattr(mu, name) for name in mu.__all__) and len(set(mu.__all__)) == len(mu.__all__)


def test_public_names_are_documented():
    """Every public function and class of the package has a docstring."""
    missing = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            public = isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
            if public and not ast.get_docstring(node):
                missing.append(f"{path.stem}.{node.name}")
    assert not missing, missing
