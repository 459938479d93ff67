"""The parameters of a run: the named choices (dtype, device, inputs, keep, engine) and their checks, which the
library applies (``Run.load``, ``Study.from_params``) and ``make reproduce`` and ``make sweep`` apply before anything
runs or is written.

The checks load no torch (a ``cpu`` device needs none; another device imports it to look), so the check that every
``make reproduce`` notebook process makes first costs no second of imports. ``make`` uses the same checks
(:func:`check_dtype`, :func:`check_device`, :func:`check_keep`, :func:`check_engine`, :func:`resolve_inputs`,
:func:`~mmflow.data.parse_n`, :func:`~mmflow.cache.env_token_budget`); a refused value is named by its ``make``
variable, so a bad parameter stops the run before a notebook (or a committed executed copy) is touched. Output
folders (``OUT``, ``CACHE``) must be folders the user can write and may not be a system folder, the home folder
itself or the project root.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mmflow.checkpoints import EMBEDDED_MODEL, EMBEDDED_MODELS
from mmflow.errors import MmflowError
from mmflow.paper import INPUTS

#: Dtypes a model can be loaded in.
DTYPES = ("float32", "float16", "bfloat16")
#: Which examples a run analyses: the paper's filter (answered correctly), or all of them.
KEEP = ("correct", "all")
#: The knockout engines, by name (:data:`mmflow.engines.ENGINES` implements each; tested).
ENGINE_NAMES = ("fast", "naive")

#: Folders never written to themselves (nor the home folder, nor the project root).
SYSTEM_FOLDERS = (
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/log", "/var/tmp",
)  # fmt: skip
#: Folders nothing is ever written inside.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr")  # fmt: skip
#: The project's root (the folder holding the Makefile and this package).
PROJECT = Path(__file__).resolve().parent.parent


def _resolved(paths: tuple[str, ...]) -> set[Path]:
    return {Path(p) for p in paths} | {Path(p).resolve() for p in paths}


def check_output_folder(path: str | Path | None, name: str, owned: bool = False) -> Path | None:
    """The absolute folder ``path`` (``~`` expanded, links resolved), after checking that mmflow may write there.

    Refused: an empty value, a system folder (``/``, ``/etc``, ``/usr``, ``/tmp`` itself, ...) or anything inside
    ``/bin``, ``/boot``, ``/dev``, ``/etc``, ``/lib*``, ``/proc``, ``/sbin``, ``/sys``, ``/usr`` (unless it lies in
    the project, wherever the project is); the home folder
    itself; the project root itself; a path that is a file; a folder (or, if it does not exist yet, its nearest
    existing parent) the user cannot write; with ``owned``, an existing folder that belongs to another user.
    None (not given) passes.

    Raises:
        MmflowError: naming ``name`` (the ``make`` variable) and the path.

    Example:
        >>> try:
        ...     check_output_folder("/", "OUT")
        ... except MmflowError as err:
        ...     print(err)
        OUT='/' is or lies in a system folder (/): name a folder of your own, e.g. OUT=results/mine
    """
    if path is None:
        return None
    text = str(path).strip()
    if not text:
        raise MmflowError(f"{name} is empty: name a folder (relative to the project or absolute)")
    folder = Path(text).expanduser().resolve()
    hint = f"name a folder of your own, e.g. {name}=results/mine"
    inside_system_tree = PROJECT not in folder.parents and any(t in folder.parents for t in _resolved(SYSTEM_TREES))
    if folder in _resolved(SYSTEM_FOLDERS) or inside_system_tree:
        raise MmflowError(f"{name}={text!r} is or lies in a system folder ({folder}): {hint}")
    if folder == Path.home().resolve() or folder == PROJECT:
        what = "the project root" if folder == PROJECT else "your home folder"
        raise MmflowError(f"{name}={text!r} is {what} itself ({folder}): {hint}")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MmflowError(f"{name}={text!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MmflowError(f"{name}={text!r}: {existing} is not writable by you")
    if owned and existing == folder and folder.stat().st_uid != os.geteuid():
        raise MmflowError(f"{name}={text!r}: {folder} belongs to another user: {hint}")
    return folder


def check_dtype(dtype: str) -> None:
    """Raise unless ``dtype`` names one of :data:`DTYPES`.

    Raises:
        MmflowError: naming the parameter and the allowed values.
    """
    if dtype not in DTYPES:
        raise MmflowError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


def check_device(device: str) -> None:
    """Raise unless ``device`` is a torch device this machine has (a CUDA device of that index, or MPS); ``cpu``
    always exists and is accepted without importing torch.

    Raises:
        MmflowError: naming ``device`` and what this machine has.
    """
    if device == "cpu":
        return
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise MmflowError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from err
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (kind.index or 0) >= count:
            found = f"{count} CUDA device(s)" if torch.backends.cuda.is_built() else "a torch built without CUDA"
            raise MmflowError(f"device {device!r} is not available: this machine has {found}; use device='cpu'")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise MmflowError(f"device {device!r} is not available: this machine has no MPS (Apple GPU); use device='cpu'")


def check_keep(keep: str) -> None:
    """Raise unless ``keep`` is one of :data:`KEEP`.

    Raises:
        MmflowError: naming the parameter.
    """
    if keep not in KEEP:
        raise MmflowError(f"keep must be one of {list(KEEP)}, got {keep!r}")


def check_engine(engine: str) -> None:
    """Raise unless ``engine`` is one of :data:`ENGINE_NAMES`.

    Raises:
        MmflowError: naming the parameter and the engines.
    """
    if engine not in ENGINE_NAMES:
        raise MmflowError(f"engine must be one of {list(ENGINE_NAMES)}, got {engine!r}")


def resolve_inputs(inputs: str | None, model: str) -> str:
    """The inputs mode: ``inputs`` if given; by default "paper" for real checkpoints and "processor" for the
    embedded models (trained on their processor's prompt: shapes-llava's word-level vocabulary has no system prompt;
    for shapes-qwen the two are the same turn).

    Raises:
        MmflowError: for an unknown mode.

    Example:
        >>> resolve_inputs(None, "llava-hf/llava-1.5-7b-hf"), resolve_inputs(None, "shapes-llava")
        ('paper', 'processor')
    """
    if inputs is None:
        return "processor" if model in EMBEDDED_MODELS else "paper"
    if inputs not in INPUTS:
        raise MmflowError(f"inputs must be one of {list(INPUTS)} (or None for the default), got {inputs!r}")
    return inputs


def check_run_params(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    inputs: str | None = None,
    keep: str | None = None,
    n: str | None = None,
    out_dir: str | None = None,
    cache_dir: str | None = None,
    engine: str | None = None,
) -> None:
    """Check every parameter of a run with the library's own checkers (empty or None: the default) and the
    ``MMFLOW_TOKEN_BUDGET`` the Makefile exports; nothing is loaded or written.

    Raises:
        MmflowError: prefixed with the ``make`` variable and its value (``DEVICE='cuda': ...``).
    """
    from mmflow.cache import TOKEN_BUDGET_ENV, env_token_budget
    from mmflow.checkpoints import local_folder
    from mmflow.data import parse_n

    checks: list[tuple[str, str | None, Callable[[], object]]] = [
        ("MODEL", model, lambda: local_folder(model or EMBEDDED_MODEL)),
        ("DTYPE", dtype, lambda: check_dtype(dtype or "float32")),
        ("DEVICE", device, lambda: check_device(device or "cpu")),
        ("INPUTS", inputs, lambda: resolve_inputs(inputs or None, model or EMBEDDED_MODEL)),
        ("KEEP", keep, lambda: check_keep(keep or "correct")),
        ("ENGINE", engine, lambda: check_engine(engine or "fast")),
        ("N", n, lambda: parse_n(n or "")),
        ("TOKEN_BUDGET", os.environ.get(TOKEN_BUDGET_ENV), env_token_budget),
        ("OUT", out_dir, lambda: check_output_folder(out_dir, "OUT", owned=True)),
        ("CACHE", cache_dir, lambda: check_output_folder(cache_dir, "CACHE")),
    ]
    for name, value, check in checks:
        try:
            check()
        except MmflowError as err:
            message = str(err)
            raise MmflowError(message if message.startswith(f"{name}=") else f"{name}={value!r}: {message}") from err


def main(argv: list[str] | None = None) -> int:
    """``python -m mmflow.params --target sweep --dtype ... --cache-dir ...``: check a make target's parameters
    once, before it starts its processes; exit status 2 (and the culprit on stderr) for a bad one."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--target", default="reproduce")
    for name in ("model", "device", "dtype", "inputs", "keep", "n", "out_dir", "cache_dir", "engine", "models", "jobs"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    args = vars(parser.parse_args(argv))
    target, models, jobs = args.pop("target"), args.pop("models") or "", args.pop("jobs")
    try:
        check_run_params(**args)
        for model in models.split():  # notebook 6's MODELS, each like MODEL
            try:
                check_run_params(model, inputs=args["inputs"])
            except MmflowError as err:
                raise MmflowError(f"MODELS={models!r}: {str(err).split(': ', 1)[-1]}") from None
        if jobs is not None and not (jobs.strip().isdigit() and int(jobs) > 0):
            raise MmflowError(f"JOBS={jobs!r}: how many notebooks run side by side must be a positive integer")
    except MmflowError as err:
        print(f"make {target}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
