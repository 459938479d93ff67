"""Execute one notebook headlessly with papermill: ``python -m mmflow.execute SOURCE EXECUTED [--model ...]``.

What ``make reproduce`` runs for each notebook. It passes a notebook only the parameters its ``parameters`` cell
declares, resolves paths relative to the directory the command was started in (papermill itself runs in
``notebooks/``), and names the notebook and the executed copy when a cell fails.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import nbformat

from mmflow.cache import CACHE_DIR_ENV
from mmflow.checkpoints import EMBEDDED_MODEL
from mmflow.data import parse_n
from mmflow.errors import MmflowError
from mmflow.params import check_output_folder, check_run_params

#: Options whose values are paths, made absolute against the caller's directory.
PATH_OPTIONS = ("data", "images", "out_dir", "cache_dir")
#: Set by ``make reproduce``: how many notebooks it runs side by side (``JOBS``).
JOBS_ENV = "MMFLOW_JOBS"
#: The variables that set a kernel's CPU threads (torch's OpenMP pool); one the user set is left alone.
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def kernel_pythonpath() -> str:
    """The kernel's ``PYTHONPATH``: this checkout first (the folder that holds the ``mmflow`` package running this
    command), then the caller's. The kernel then imports this checkout's code, models and notebooks' helpers, not
    whatever checkout the virtual environment's editable install points at (a venv shared by two clones)."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


def parallel_jobs() -> int:
    """How many notebooks run side by side (``$MMFLOW_JOBS``, set by ``make reproduce``; 1 if unset or not a
    positive integer)."""
    text = os.environ.get(JOBS_ENV, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1


def kernel_threads(jobs: int, cpus: int | None = None) -> dict[str, str]:
    """The thread settings a notebook's kernel gets when ``jobs`` notebooks run side by side: an even share of the
    CPU cores each (at least one), so that they do not oversubscribe the machine; nothing when one runs alone or
    when the user set a thread count (e.g. two notebooks on 2 cores: one thread each; on 16 cores: eight)."""
    if jobs <= 1 or any(name in os.environ for name in THREAD_ENVS):
        return {}
    share = str(max(1, (cpus or os.cpu_count() or 1) // jobs))
    return {name: share for name in THREAD_ENVS}


def compared_models(model: str | None, models: str | None) -> list[str] | None:
    """The models notebook 6 compares in a run: ``MODELS`` (whitespace-separated) if given, else the one ``MODEL``
    the run names unless it is the default; None: the notebook's own ``models`` default (both embedded models).

    Example:
        >>> compared_models("shapes-llava", " "), compared_models("my/llava", ""), compared_models("x", "a b")
        (None, ['my/llava'], ['a', 'b'])
    """
    if (models or "").split():
        return (models or "").split()
    if model and model != EMBEDDED_MODEL:
        return [model]
    return None


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

    def place_model(model: str) -> str:
        if model.startswith((".", "/", "~")) or Path(model).expanduser().exists():  # a folder, not a hub id
            return place(model)
        return model

    compared = compared_models(given.get("model"), given.get("models"))
    for name in PATH_OPTIONS:
        if given.get(name) and not (name == "data" and given[name] == "shapes"):
            given[name] = place(given[name])
    if given.get("model"):
        given["model"] = place_model(given["model"])
    if compared is None:
        given.pop("models", None)
    else:
        given["models"] = [place_model(m) for m in compared]
    if "n_per_task" in given:
        given["n_per_task"] = parse_n(given["n_per_task"])
    return {name: value for name, value in given.items() if name in declared}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, execute the notebook, and return the exit status (1 if a cell failed)."""
    import papermill as pm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("executed", type=Path)
    names = ("model", "models", "data", "images", "device", "dtype", "out_dir", "cache_dir", "engine", "inputs", "keep")
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    parser.add_argument("--n", dest="n_per_task", help="questions per task (0 or empty: the default)")
    args = parser.parse_args(argv)
    workdir = args.executed.parent.resolve()
    try:  # every parameter is named before anything runs or is written
        check_run_params(args.model, args.device, args.dtype, args.inputs, args.keep, args.n_per_task,
                         args.out_dir, args.cache_dir, args.engine)  # fmt: skip
        for model in (args.models or "").split():
            check_run_params(model, inputs=args.inputs)
        check_output_folder(args.executed.parent, "EXECUTED")
        declared = pm.inspect_notebook(str(args.source))
        params = notebook_parameters(args, list(declared), relative_to=workdir)
        cache_elsewhere = record_default_cache(params, declared, args.source, workdir)
    except MmflowError as err:
        print(f"make reproduce: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwinds: the kernel stops, the progress folder goes
    args.executed.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {args.source.stem}", flush=True)
    jobs = parallel_jobs()
    label = args.source.stem if jobs > 1 else None  # side by side, each progress line names its notebook
    with terminal_progress(label=label), environment(CACHE_DIR_ENV, cache_elsewhere), contextlib.ExitStack() as stack:
        stack.enter_context(environment("PYTHONPATH", kernel_pythonpath()))
        for name, value in kernel_threads(jobs).items():
            stack.enter_context(environment(name, value))
        status = _execute(pm, args, params, workdir)
    if status == 0:
        settle(args.executed)
    return status


def record_default_cache(params: dict, declared: dict, source: Path, workdir: Path) -> str | None:
    """Make the executed copy record the notebook's default cache folder (relative to the copy), never a machine's
    cache folder, so a run with another ``CACHE`` writes the same executed copy; returns the cache folder actually
    used if it differs from the default (the kernel reads it from :data:`~mmflow.cache.CACHE_DIR_ENV`), else None.
    """
    if "cache_dir" not in params or "cache_dir" not in declared:
        return None
    default = (source.parent / ast.literal_eval(declared["cache_dir"]["default"])).resolve()
    used = (workdir / params["cache_dir"]).resolve()
    params["cache_dir"] = os.path.relpath(default, workdir)
    return None if used == default else str(used)


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """Set (or, for None, remove) an environment variable the kernel inherits; restored afterwards."""
    previous = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if previous is not None:
            os.environ[name] = previous


def _exit_on_signal(signum: int, frame) -> None:
    sys.exit(128 + signum)


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


#: Progress folders are ``<tmp>/mmflow-progress-<pid>-<random>``: one whose process is gone is removed.
PROGRESS_PREFIX = "mmflow-progress-"


def remove_stale_progress() -> list[Path]:
    """Remove this user's progress folders left by a ``make reproduce`` that was killed (its pid is gone on this
    machine; a folder of a live process is never touched); returns what was removed."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{PROGRESS_PREFIX}*-*"):
        pid = folder.name[len(PROGRESS_PREFIX) :].split("-")[0]
        if pid.isdigit() and folder.stat().st_uid == os.geteuid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def terminal_progress(interval: float = 0.5, label: str | None = None):
    """Show on stderr what the notebook's runs write to their progress file (see :data:`mmflow.cache.PROGRESS_ENV`):
    per-example progress with an ETA in the terminal, none in the executed notebook. With a ``label`` (notebooks
    running side by side) every update is a whole line that starts with it, so the notebooks' lines do not overwrite
    each other."""
    from mmflow.cache import PROGRESS_ENV

    remove_stale_progress()
    folder = tempfile.mkdtemp(prefix=f"{PROGRESS_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # also after SIGTERM (see main) or an error
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
                if text and label is not None:
                    text = "".join(f"[{label}] {line.strip()}\n" for line in re.split(r"[\r\n]", text) if line.strip())
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
