"""JupyterLab as ``make lab`` starts it: the notebooks folder, on 127.0.0.1, with a save hook that keeps the
notebook sources clean in git (outputs live in the browser session and in ``notebooks/executed/``, never in the
tracked sources)."""

from __future__ import annotations

from typing import Any


def strip_outputs(model: dict[str, Any], path: str, **_: Any) -> None:
    """Jupyter ``pre_save_hook``: drop outputs and execution counts from a notebook source before it is saved.

    Executed copies (under ``executed/``) keep their outputs.

    Example:
        >>> cell = {"cell_type": "code", "outputs": [{"text": "1"}], "execution_count": 3, "metadata": {}}
        >>> model = {"type": "notebook", "content": {"cells": [cell]}}
        >>> strip_outputs(model, "1_to_last_flow.ipynb")
        >>> cell["outputs"], cell["execution_count"]
        ([], None)
    """
    if model.get("type") != "notebook" or "executed/" in path.replace("\\", "/"):
        return
    for cell in model["content"].get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell.get("metadata", {}).pop("execution", None)
