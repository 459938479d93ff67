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

from mmflow.errors import MmflowError

#: Options whose values are paths, made absolute against the caller's directory.
PATH_OPTIONS = ("data", "images", "out_dir", "cache_dir")


def notebook_parameters(args: argparse.Namespace, declared: list[str]) -> dict:
    """The parameters to pass: the given options this notebook declares, paths made absolute, ``N`` parsed.

    Raises:
        MmflowError: for an ``N`` that is not a non-negative integer.
    """
    given = {k: v for k, v in vars(args).items() if v not in (None, "") and k not in ("source", "executed")}
    for name in PATH_OPTIONS:
        if given.get(name) and not (name == "data" and given[name] == "shapes"):
            given[name] = str(Path(given[name]).expanduser().resolve())
    if given.get("model") and Path(given["model"]).expanduser().exists():  # a local folder, not a hub id
        given["model"] = str(Path(given["model"]).expanduser().resolve())
    if "n_per_task" in given:
        text = given["n_per_task"].strip()
        if text == "0":
            given["n_per_task"] = None
        elif text.isdigit():
            given["n_per_task"] = int(text)
        else:
            raise MmflowError(
                f"N (questions per task) must be a non-negative integer (0 or empty: the default), got {text!r}"
            )
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
    try:
        params = notebook_parameters(args, list(pm.inspect_notebook(str(args.source))))
    except MmflowError as err:
        print(f"make reproduce: {err}", file=sys.stderr)
        return 2
    args.executed.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {args.source.stem}", flush=True)
    with terminal_progress():
        return _execute(pm, args, params)


@contextlib.contextmanager
def terminal_progress(interval: float = 0.5):
    """Show on stderr what the notebook's runs write to their progress file (see :data:`mmflow.runs.PROGRESS_ENV`):
    per-example progress with an ETA in the terminal, none in the executed notebook."""
    from mmflow.runs import PROGRESS_ENV

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


def _execute(pm, args: argparse.Namespace, params: dict) -> int:
    try:
        pm.execute_notebook(
            str(args.source),
            str(args.executed),
            parameters=params,
            kernel_name="mmflow",
            cwd=str(args.source.parent),
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
