"""The results cache: one JSON file per example, named by the example's content hash, checked on read, written
atomically; shards; progress.

Layout: ``<cache_dir>/<configuration key>/<example digest>.json``. The configuration key hashes what the
computation depends on besides the example (kind, model fingerprint, flows, window, engine, dtype, inputs, keep);
the file name is the example's content hash (:meth:`~mmflow.data.Example.digest`), never a value from the data.
Each file records the digest it was computed for and is checked on read; a corrupt or mismatched file is reported
by name and recomputed. Writes go to a unique temporary file that is atomically renamed, so processes can share a
cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmflow.data import Example
from mmflow.errors import MmflowError


def config_key(**config: Any) -> str:
    """A short stable hash of a configuration (the cache folder of its results).

    Example:
        >>> config_key(kind="lens", dtype="float32") == config_key(dtype="float32", kind="lens")
        True
    """
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_of(items: Sequence[Any], shard: tuple[int, int] = (0, 1)) -> list[Any]:
    """Items of shard ``i`` of ``n`` (round robin), so ``n`` processes split a run without overlap.

    Raises:
        MmflowError: for a shard that does not exist.

    Example:
        >>> shard_of("abcde", (1, 2))
        ['b', 'd']
    """
    i, n = shard
    if not 0 <= i < n:
        raise MmflowError(f"Shard {i} of {n} does not exist")
    return list(items[i::n])


def check_unique_ids(examples: Sequence[Example]) -> None:
    """Raise if two examples share an id (one would silently replace the other in every table).

    Raises:
        MmflowError: naming the id and both examples (their file and line where known, else their positions).
    """
    seen: dict[str, int] = {}
    for i, example in enumerate(examples):
        if example.example_id in seen:
            first = examples[seen[example.example_id]]
            raise MmflowError(
                f"Duplicate example id {example.example_id!r}: examples #{seen[example.example_id]} "
                f"({first.source or first.task}) and #{i} ({example.source or example.task})"
            )
        seen[example.example_id] = i


#: The largest cache file read (a result is a few kB; a bigger file is not one of ours).
MAX_RESULT_BYTES = 64 * 2**20
#: Suffix of the temporary files of atomic writes, and after how long one is a leftover of a killed write.
TMP_SUFFIX = ".tmp"
STALE_SECONDS = 3600.0


class ResultCache:
    """One configuration's results, one JSON file per example, named by the example's digest."""

    def __init__(self, cache_dir: str | Path, key: str):
        self.folder = Path(cache_dir) / key

    def path(self, digest: str) -> Path:
        """The result file of an example digest (hex only, so it always lies inside :attr:`folder`)."""
        if not digest or any(c not in "0123456789abcdef" for c in digest):
            raise MmflowError(f"Not an example digest: {digest!r}")
        return self.folder / f"{digest}.json"

    def read(self, digest: str) -> dict[str, Any] | None:
        """The cached result, or None if there is none or the file is unusable (reported by name): only a regular
        file of at most :data:`MAX_RESULT_BYTES` is read (never a device, a FIFO or a link to one)."""
        path = self.path(digest)
        if not os.path.lexists(path):
            return None
        try:
            result = json.loads(read_regular(path, MAX_RESULT_BYTES))
            if (
                not isinstance(result, dict)
                or result.get("example_digest") != digest
                or not isinstance(result.get("rows"), list)
            ):
                raise ValueError("it was not computed for this example")
            return result
        except (ValueError, OSError) as err:
            warnings.warn(f"Ignoring the unusable cached result {path} ({err}); recomputing it", stacklevel=3)
            return None

    def write(self, digest: str, result: dict[str, Any]) -> dict[str, Any]:
        """Write atomically (a unique temporary file, then rename); returns the result as read back."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**result, "example_digest": digest})  # one string, written at once and read back
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{digest[:12]}-", suffix=TMP_SUFFIX)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a shared cache's group
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.path(digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return json.loads(text)  # the same types a later read gives

    def remove_stale(self, age: float = STALE_SECONDS) -> list[Path]:
        """Remove the temporary files of writes killed mid-way: older than ``age`` seconds (a write holds its
        temporary file for the milliseconds a JSON dump takes, so a live write's file is never that old, on any
        machine sharing the cache); returns what was removed."""
        removed = []
        for tmp in self.folder.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):  # gone meanwhile (another process cleaned it)
                if tmp.is_file() and time.time() - tmp.lstat().st_mtime > age:
                    tmp.unlink()
                    removed.append(tmp)
        return removed


def read_regular(path: Path, limit: int) -> str:
    """The text of ``path`` if it is a regular file of at most ``limit`` bytes (opened without blocking, so a FIFO
    cannot hang the run, and checked on the opened file, so a swapped file cannot slip through).

    Raises:
        ValueError: naming what the file is instead.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("it is not a regular file (a device, a FIFO or a link to one)")
        if info.st_size > limit:
            raise ValueError(f"it holds {info.st_size} bytes, more than the {limit} a result can")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it holds more than the {limit} bytes a result can")
    return data.decode("utf-8")


def _umask() -> int:
    """The process umask (read from /proc on Linux, which changes nothing; elsewhere set and restored)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def interactive_frontend() -> bool:
    """True in a kernel started by a Jupyter server (JupyterLab/Notebook) or VS Code, False under papermill."""
    return any(name in os.environ for name in ("JPY_SESSION_NAME", "VSCODE_PID"))


#: Set by ``make reproduce`` (mmflow.execute): a file whose text the terminal shows while the notebook runs.
PROGRESS_ENV = "MMFLOW_PROGRESS"
#: Set by ``make reproduce`` for a ``CACHE`` other than the notebook's default: the cache folder a notebook's
#: :class:`~mmflow.study.Study` uses instead of its ``cache_dir`` parameter (which the executed copy records).
CACHE_DIR_ENV = "MMFLOW_CACHE_DIR"


def _progress_stream():
    """Where text progress goes outside a live notebook: the file ``make reproduce`` shows in the terminal, or
    stderr; None in a live notebook (a widget bar instead)."""
    if interactive_frontend():
        return None
    path = os.environ.get(PROGRESS_ENV)
    return open(path, "a", buffering=1) if path else sys.stderr  # noqa: SIM115 - written to until the run ends


#: Environment variable that sets the fast engine's token budget when the call leaves it None (``make ...
#: TOKEN_BUDGET=n`` exports it).
TOKEN_BUDGET_ENV = "MMFLOW_TOKEN_BUDGET"


def env_token_budget() -> int | None:
    """The token budget ``$MMFLOW_TOKEN_BUDGET`` sets (``make ... TOKEN_BUDGET=n``), None if unset or empty; the
    commands check it before they start.

    Raises:
        MmflowError: naming the variable, for a value that is not a positive integer.
    """
    text = os.environ.get(TOKEN_BUDGET_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise MmflowError(
            f"{TOKEN_BUDGET_ENV} must be a positive integer number of tokens (or unset: from free memory), got {text!r}"
        )
    return int(text)


def progress_note(text: str) -> None:
    """Write a line where progress goes (the terminal of ``make reproduce``, or stderr); nothing in a live notebook."""
    stream = _progress_stream()
    if stream is not None:
        print(text, file=stream, flush=True)
        if stream is not sys.stderr:
            stream.close()


def _progress_bar(stream):
    """A widget progress bar in a live notebook, else a text one on ``stream`` (every 2 s, with its ETA)."""
    from functools import partial

    if stream is None:
        from tqdm.auto import tqdm

        return tqdm
    from tqdm.std import tqdm

    return partial(tqdm, file=stream, mininterval=2.0, dynamic_ncols=False, ncols=90)


def run_cached(
    examples: Sequence[Example],
    compute: Callable[[Example, str], dict[str, Any]],
    cache_dir: str | Path,
    key: str,
    shard: tuple[int, int] = (0, 1),
    desc: str = "examples",
) -> list[dict[str, Any]]:
    """Run ``compute(example, digest)`` on each example of the shard not cached yet, caching each result (see the
    module docstring); the digest is computed once per example and handed on, and an image file is decoded once
    for both.

    Cached examples are skipped, so an interrupted run resumes where it stopped and gives identical results.

    Returns:
        This shard's results; :func:`merge_cached` collects all shards.
    """
    return run_cached_together(examples, [(key, compute, desc)], cache_dir, shard)[0]


def run_cached_together(
    examples: Sequence[Example],
    jobs: Sequence[tuple[str, Callable[[Example, str], dict[str, Any]], str]],
    cache_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
) -> list[list[dict[str, Any]]]:
    """:func:`run_cached` for several configurations ``jobs`` (``(key, compute, desc)``) example by example: each
    example of the shard is visited once, by every job in turn (so what they share about it can be reused while it
    is at hand), and each job's results and cache files are the ones :func:`run_cached` would give it alone.

    Returns:
        Per job, this shard's results.
    """
    stream = _progress_stream()
    caches = [ResultCache(cache_dir, key) for key, _, _ in jobs]
    for cache in caches:
        cache.remove_stale()
    results: list[list[dict[str, Any]]] = [[] for _ in jobs]
    computed = [0] * len(jobs)
    desc = jobs[0][2] if len(jobs) == 1 else "analyses"
    for example in _progress_bar(stream)(shard_of(examples, shard), desc=desc, leave=False):
        example = example.with_image()  # decoded once, for the digest and the computation
        digest = example.digest()
        for i, ((_, compute, _), cache) in enumerate(zip(jobs, caches)):
            result = cache.read(digest)
            if result is None:
                result, computed[i] = cache.write(digest, compute(example, digest)), computed[i] + 1
            results[i].append(result)
    if stream is not None:  # measured and printed: after `make sweep`, `make reproduce` computes nothing
        for (_, _, what), done, found in zip(jobs, computed, results):
            print(f"{what}: {done} of {len(found)} examples computed, {len(found) - done} from the cache", file=stream,
                  flush=True)  # fmt: skip
        if stream is not sys.stderr:
            stream.close()  # the progress file opened for this run
    return results


def merge_cached(cache_dir: str | Path, key: str, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """All cached results of a configuration, in example order.

    Raises:
        MmflowError: naming the examples no shard has computed yet.
    """
    cache = ResultCache(cache_dir, key)
    results = [cache.read(e.digest()) for e in examples]
    missing = [e.example_id for e, r in zip(examples, results) if r is None]
    if missing:
        raise MmflowError(
            f"{len(missing)} examples not computed yet in {cache.folder} (e.g. {missing[:3]}): run the missing shards"
        )
    return results


@contextlib.contextmanager
def folder_lock(folder: str | Path):
    """Hold an exclusive lock on ``folder`` itself (``flock`` on the directory: no lock file is left behind) until
    the block ends; other processes wait. Where ``flock`` does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock
