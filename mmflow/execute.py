"""Execute one notebook headlessly with papermill: ``python -m mmflow.execute SOURCE EXECUTED [--model ...]``.

What ``make reproduce`` runs for each notebook. It passes a notebook only the parameters its ``parameters`` cell
declares, resolves paths relative to the directory the command was started in (papermill itself runs in
``notebooks/``), and names the notebook and the executed copy when a cell fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import nbformat

from mmflow.cache import env_token_budget
from mmflow.data import parse_n
from mmflow.errors import MmflowError

#: Options whose values are paths, made absolute against the caller's directory.
PATH_OPTIONS = ("data", "images", "out_dir", "cache_dir")


def notebook_parameters(args: argparse.Namespace, declared: list[str], relative_to: Path | None = None) -> dict:
    """The parameters to pass: the given options this notebook declares, paths resolved against the directory the
    command runs in (then written relative to ``relative_to``, the notebook's working directory, if given, so an
    executed copy runs again anywhere), ``N`` parsed.

    Raises:
        MmflowError: for an ``N`` that is not a non-negative integer.
    """
    given = {k: v for k, v in vars(args).items() if v not in (None, "") and k not in ("source", "executed")}

    def place(path: str) -> str:
        absolute = Path(path).expanduser().resolve()
        return os.path.relpath(absolute, relative_to) if relative_to is not None else str(absolute)

    for name in PATH_OPTIONS:
        if given.get(name) and not (name == "data" and given[name] == "shapes"):
            given[name] = place(given[name])
    model = given.get("model", "")
    if model and (model.startswith((".", "/", "~")) or Path(model).expanduser().exists()):  # a folder, not a hub id
        given["model"] = place(given["model"])
    if "n_per_task" in given:
        given["n_per_task"] = parse_n(given["n_per_task"])
    return {name: value for name, value in given.items() if name in declared}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, execute the notebook, and return the exit status (1 if a cell failed)."""
    import papermill as pm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("executed", type=Path)
    for name in ("model", "data", "images", "device", "dtype", "out_dir", "cache_dir", "engine", "inputs", "keep"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    parser.add_argument("--n", dest="n_per_task", help="questions per task (0 or empty: the default)")
    args = parser.parse_args(argv)
    workdir = args.executed.parent.resolve()
    try:
        params = notebook_parameters(args, list(pm.inspect_notebook(str(args.source))), relative_to=workdir)
        env_token_budget()  # a bad TOKEN_BUDGET is named before anything runs or is written
    except MmflowError as err:
        print(f"make reproduce: {err}", file=sys.stderr)
        return 2
    args.executed.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {args.source.stem}", flush=True)
    with terminal_progress():
        status = _execute(pm, args, params, workdir)
    if status == 0:
        settle(args.executed)
    return status


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: Papermill's notebook-level metadata that changes on every run (times, absolute paths, the environment).
VOLATILE = ("start_time", "end_time", "duration", "input_path", "output_path", "environment_variables")


def settle(executed: Path) -> None:
    """Drop what changes on every run (times, absolute paths, widget state) from an executed copy, so a rerun
    with the same results writes the same file."""
    book = nbformat.read(executed, as_version=4)
    for key in VOLATILE:
        book.metadata.get("papermill", {}).pop(key, None)
    strip_widgets(book)
    for cell in book.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill draws a random id
    nbformat.write(book, executed)


def strip_widgets(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without widget state and widget views (random model ids; their text fallback stays)."""
    book.metadata.pop("widgets", None)
    for cell in book.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_VIEW, None)
    return book


@contextlib.contextmanager
def terminal_progress(interval: float = 0.5):
    """Show on stderr what the notebook's runs write to their progress file (see :data:`mmflow.cache.PROGRESS_ENV`):
    per-example progress with an ETA in the terminal, none in the executed notebook."""
    from mmflow.cache import PROGRESS_ENV

    folder = tempfile.mkdtemp(prefix="mmflow-progress-")
    path = os.path.join(folder, "progress")
    open(path, "w").close()
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = path  # the kernel inherits it
    done = threading.Event()

    def follow() -> None:
        with open(path) as handle:
            while True:
                finished = done.is_set()
                text = handle.read()
                if text:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                if finished:
                    return
                done.wait(interval)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stderr.write("\n")
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def _execute(pm, args: argparse.Namespace, params: dict, workdir: Path) -> int:
    try:
        pm.execute_notebook(
            str(args.source),
            str(args.executed),
            parameters=params,
            kernel_name="mmflow",
            cwd=str(workdir),  # the executed copy's folder: its relative paths hold there (nbval reruns it there)
            progress_bar=False,  # the runs show per-example progress with an ETA on the terminal instead
        )
    except pm.PapermillExecutionError as err:
        print(
            f"make reproduce: notebook {args.source.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"(executed copy with the traceback: {args.executed})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
