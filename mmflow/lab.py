"""JupyterLab as ``make lab`` starts it: the notebooks folder, on 127.0.0.1, with a save hook that keeps the
notebook sources clean in git (outputs live in the browser session and in ``notebooks/executed/``, never in the
tracked sources), and no news or update pop-up over the explorers (the settings in :data:`SETTINGS_DIR`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: JupyterLab's application settings folder for ``make lab``: its ``overrides.json`` turns off the "get notified
#: about Jupyter news?" pop-up and the update check (read only: nothing is written outside the repository).
SETTINGS_DIR = Path(__file__).resolve().parent / "lab_settings"


def strip_outputs(model: dict[str, Any], path: str, **_: Any) -> None:
    """Jupyter ``pre_save_hook``: save a notebook source as it is kept in git: no outputs, no execution counts, and
    none of the metadata a session adds (language version details, widget state, timings).

    Executed copies (under ``executed/``) are saved as they are.

    Example:
        >>> cell = {"cell_type": "code", "outputs": [{"text": "1"}], "execution_count": 3, "metadata": {}}
        >>> model = {"type": "notebook", "content": {"cells": [cell]}}
        >>> strip_outputs(model, "1_to_last_flow.ipynb")
        >>> cell["outputs"], cell["execution_count"]
        ([], None)
    """
    if model.get("type") != "notebook" or "executed/" in path.replace("\\", "/"):
        return
    metadata = model["content"].get("metadata", {})
    language = metadata.get("language_info", {}).get("name")
    for key in [k for k in metadata if k not in ("kernelspec", "language_info")]:
        del metadata[key]  # what a session adds (widget state, ...) is not part of the source
    if language:
        metadata["language_info"] = {"name": language}  # not the kernel's version details
    for cell in model["content"].get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell.get("metadata", {}).pop("execution", None)


def lab_command(root_dir: str, port: int = 8888, token: str | None = None) -> list[str]:
    """The ``jupyter lab`` command ``make lab`` runs (the browser test runs the same one): 127.0.0.1 only, no
    browser opened, the clean-source save hook, no calls to the internet for news or updates and no pop-up asking
    about them (the overrides in :data:`SETTINGS_DIR`)."""
    command = [
        str(Path(sys.executable).with_name("jupyter")),
        "lab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root_dir}",
        "--FileContentsManager.pre_save_hook=mmflow.lab.strip_outputs",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.app_settings_dir={SETTINGS_DIR}",
    ]
    if os.geteuid() == 0:  # containers and CI run as root; Jupyter refuses that unless told
        command.append("--ServerApp.allow_root=True")
    return command + ([f"--IdentityProvider.token={token}"] if token is not None else [])


def main(argv: list[str] | None = None) -> int:
    """``python -m mmflow.lab [--port N]``: serve ``notebooks/`` and print the URL (with its token)."""
    parser = argparse.ArgumentParser(description="JupyterLab on the mmflow notebooks")
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args(argv)
    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    return subprocess.call(lab_command(str(notebooks), args.port))


if __name__ == "__main__":
    sys.exit(main())
