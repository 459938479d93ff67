"""Experiments over many examples: the paper's correctness filter, a results cache keyed by content, shards.

Cache layout: ``<cache_dir>/<configuration key>/<example digest>.json``. The configuration key hashes what the
computation depends on besides the example (kind, model fingerprint, flows, window, engine, dtype); the file name
is the example's content hash (:meth:`~mmflow.data.Example.digest`), never a value from the data. Each file
records the digest it was computed for and is checked on read; a corrupt or mismatched file is reported by name
and recomputed. Writes go to a unique temporary file and are atomically renamed, so processes can share a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mmflow.data import Example
from mmflow.errors import MmflowError
from mmflow.inputs import Encoded, encode_example, resolve_inputs
from mmflow.knockout import check_flows, check_window, has_empty_group, knockout_sweep
from mmflow.lens import ANSWER, FALSE_OPTION, LENS_VIEWS, answer_token_ids, logit_lens, token_label
from mmflow.models import EMBEDDED_MODEL, REPO_DIR, LlavaModel, load_model, num_layers
from mmflow.paper import Flow, default_window, flow_name, flows_need_patches

DEFAULT_CACHE_DIR = REPO_DIR / "results"
#: Which examples a run analyses: the paper's filter (answered correctly), or all of them.
KEEP = ("correct", "all")
#: Columns of the rows of :meth:`Run.knockout` and :meth:`Run.lens` (also when no example is kept).
KNOCKOUT_COLUMNS = (
    "flow",
    "layer",
    "window_start",
    "window_end",
    "k",
    "answer_token",
    "p_base",
    "p_new",
    "rel_change",
    "example_id",
    "task",
)
LENS_COLUMNS = ("view", "layer", "token", "token_id", "prob", "example_id", "task")


def check_keep(keep: str) -> None:
    """Raise unless ``keep`` is one of :data:`KEEP`.

    Raises:
        MmflowError: naming the parameter.
    """
    if keep not in KEEP:
        raise MmflowError(f"keep must be one of {list(KEEP)}, got {keep!r}")


def _status(example: Example) -> dict[str, Any]:
    return {
        "example_id": example.example_id,
        "task": example.task,
        "question": example.question,
        "answer": example.answer,
        "source": example.source,
    }


def greedy_answer(model: LlavaModel, processor, encoded: Encoded, max_new_tokens: int = 10) -> str:
    """The model's own greedy answer (clean run), decoded without special tokens."""
    with torch.inference_mode():
        out = model.generate(**encoded.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, encoded.length :], skip_special_tokens=True)


def is_correct(predicted: str, gold: str) -> bool:
    """The paper's filter: the whole answer, stripped and lower-cased, equals the gold answer.

    Example:
        >>> is_correct(" Red.", "red"), is_correct("Red car", "red")
        (True, False)
    """
    return predicted.strip().rstrip(".").strip().lower() == gold.strip().lower()


def _without_paths(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _without_paths(v) for k, v in config.items() if k != "_name_or_path"}
    return config


def model_fingerprint(model: LlavaModel) -> str:
    """Identify a model for cache keys: its config (without local paths) and a checksum of its weights, so the
    same weights in two folders share results."""
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    config = json.dumps(_without_paths(model.config.to_dict()), sort_keys=True, default=str)
    return f"{config}|{checksum:.10e}"


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
        """The cached result, or None if there is none or the file is unusable (reported by name)."""
        path = self.path(digest)
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
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
        payload = {**result, "example_digest": digest}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{digest[:12]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle)
            os.replace(tmp, self.path(digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return json.loads(json.dumps(payload))  # the same types a later read gives


def interactive_frontend() -> bool:
    """True in a kernel started by a Jupyter server (JupyterLab/Notebook) or VS Code, False under papermill."""
    return any(name in os.environ for name in ("JPY_SESSION_NAME", "VSCODE_PID"))


#: Set by ``make reproduce`` (mmflow.execute): a file whose text the terminal shows while the notebook runs.
PROGRESS_ENV = "MMFLOW_PROGRESS"


def _progress_bar():
    """A widget progress bar in a live notebook; under ``make reproduce`` a text one (every 2 s, with its ETA) in the
    file that the terminal shows (not in the executed notebook); else a text one on stderr."""
    from functools import partial

    if interactive_frontend():
        from tqdm.auto import tqdm

        return tqdm
    from tqdm.std import tqdm

    path = os.environ.get(PROGRESS_ENV)
    stream = open(path, "a", buffering=1) if path else sys.stderr  # noqa: SIM115 - tqdm writes to it until done
    return partial(tqdm, file=stream, mininterval=2.0, dynamic_ncols=False, ncols=90)


def run_cached(
    examples: Sequence[Example],
    compute: Callable[[Example], dict[str, Any]],
    cache_dir: str | Path,
    key: str,
    shard: tuple[int, int] = (0, 1),
    desc: str = "examples",
) -> list[dict[str, Any]]:
    """Run ``compute`` on each example of the shard, caching each result (see the module docstring).

    Cached examples are skipped, so an interrupted run resumes where it stopped and gives identical results.

    Returns:
        This shard's results; :func:`merge_cached` collects all shards.
    """
    progress = _progress_bar()

    cache = ResultCache(cache_dir, key)
    results = []
    for example in progress(shard_of(examples, shard), desc=desc, leave=False):
        digest = example.digest()
        result = cache.read(digest)
        results.append(result if result is not None else cache.write(digest, compute(example)))
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


@dataclass
class Run:
    """A loaded model with its processor and the settings every experiment on it shares.

    Example::

        run = Run.load("shapes-llava")
        rows, status = run.knockout(load_examples(n=2), ["Question->Last"])
    """

    name: str
    model: LlavaModel
    processor: Any
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    fingerprint: str = ""
    inputs: str = "processor"

    @classmethod
    def load(
        cls,
        name: str = EMBEDDED_MODEL,
        device: str = "cpu",
        dtype: str = "float32",
        cache_dir: str | None = None,
        inputs: str | None = None,
    ) -> Run:
        """Load a model (see :func:`~mmflow.models.load_model`) and fingerprint it for the cache.

        ``inputs``: ``"paper"`` or ``"processor"`` (see :func:`~mmflow.inputs.encode`); None: "paper" for real
        checkpoints, "processor" for the embedded shapes-llava (:func:`~mmflow.inputs.resolve_inputs`).
        """
        mode = resolve_inputs(inputs, name)
        model, processor = load_model(name, device, dtype)
        cache = cache_dir or str(DEFAULT_CACHE_DIR)
        return cls(name, model, processor, device, dtype, cache, model_fingerprint(model), mode)

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model."""
        return num_layers(self.model)

    def encode(self, example: Example, patches: bool = False) -> Encoded:
        """Encode an example for this model (with its patch groups if ``patches``)."""
        return encode_example(
            self.processor, example, self.device, getattr(torch, self.dtype), self.model, self.inputs, patches=patches
        )

    def _check(self, example: Example, encoded: Encoded) -> dict[str, Any]:
        predicted = greedy_answer(self.model, self.processor, encoded)
        return {
            **_status(example),
            "predicted": predicted.strip(),
            "correct": is_correct(predicted, example.answer),
            "error": None,
            "located": encoded.located,
        }

    def _encode_or_record(self, example: Example, patches: bool) -> tuple[Encoded | None, dict[str, Any]]:
        """The example's encoding and status; an example that cannot be encoded is recorded with the reason."""
        try:
            encoded = self.encode(example, patches)
        except MmflowError as err:
            return None, {**_status(example), "predicted": None, "correct": False, "error": str(err), "located": {}}
        return encoded, self._check(example, encoded)

    def knockout(
        self,
        examples: Sequence[Example],
        flows: Sequence[Flow],
        window: int | None = None,
        engine: str = "fast",
        shard: tuple[int, int] = (0, 1),
        keep: str = "correct",
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Knockout sweeps over the correctly answered examples (or all, with ``keep="all"``).

        Args:
            examples: the examples (ids must be unique).
            flows: the flows to knock out (see :func:`~mmflow.knockout.knockout_sweep`).
            window: window size; None: the paper's rule for this model's depth.
            engine: knockout engine name.
            shard: ``(i, n)``: compute only shard i of n (the others may come from other processes).
            keep: ``"correct"`` (the paper's filter) or ``"all"``.

        Returns:
            ``(rows, status)``: the sweep rows of the kept examples with ``example_id`` and ``task``, and one status
            row per example (``example_id, task, question, answer, predicted, correct, error, located,
            skipped_flows``). An example that cannot be encoded is not fatal: its ``error`` says why.
        """
        check_unique_ids(examples)
        check_keep(keep)
        check_flows(flows)
        k = default_window(self.n_layers) if window is None else check_window(window)
        names = [flow_name(f) for f in flows]
        key = config_key(
            kind="knockout",
            model=self.fingerprint,
            flows=names,
            window=k,
            engine=engine,
            dtype=self.dtype,
            inputs=self.inputs,
            keep=keep,
        )
        patches = flows_need_patches(flows)
        no_boxes = [e for e in examples if e.boxes is None] if patches else []
        if no_boxes:
            raise MmflowError(
                f"{no_boxes[0].where} (and {len(no_boxes) - 1} more): the data has no box columns "
                "(e.g. 'central object x/y/w/h'), which the patch flows need"
            )

        def compute(example: Example) -> dict[str, Any]:
            encoded, status = self._encode_or_record(example, patches)
            if encoded is None:
                return {**status, "skipped_flows": [], "rows": []}
            skipped = [name for name, f in zip(names, flows) if has_empty_group(f, encoded.groups)]
            rows = []
            if (status["correct"] or keep == "all") and len(skipped) < len(flows):
                usable = [f for name, f in zip(names, flows) if name not in skipped]
                sweep = knockout_sweep(self.model, encoded, usable, k, engine)
                rows = sweep.assign(example_id=example.example_id, task=example.task).to_dict("records")
            return {**status, "skipped_flows": skipped, "rows": rows}

        return self._frames(
            run_cached(examples, compute, self.cache_dir, key, shard, desc="knockout"), KNOCKOUT_COLUMNS
        )

    def lens(
        self, examples: Sequence[Example], shard: tuple[int, int] = (0, 1), keep: str = "correct"
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Logit lens in every view of :data:`~mmflow.lens.LENS_VIEWS` for the lowercase/Capitalized answer and
        false option.

        Returns:
            ``(rows, status)`` as in :meth:`knockout`; rows have ``view, layer, token, token_id, prob``.
        """
        check_unique_ids(examples)
        check_keep(keep)
        key = config_key(kind="lens", model=self.fingerprint, dtype=self.dtype, inputs=self.inputs, keep=keep)
        tok = self.processor.tokenizer

        def compute(example: Example) -> dict[str, Any]:
            encoded, status = self._encode_or_record(example, False)
            rows = []
            if encoded is not None and (status["correct"] or keep == "all"):
                tokens = {token_label(ANSWER, form): tid for form, tid in answer_token_ids(tok, example.answer).items()}
                if example.false_option:
                    tokens.update(
                        {
                            token_label(FALSE_OPTION, form): tid
                            for form, tid in answer_token_ids(tok, example.false_option).items()
                        }
                    )
                frame = logit_lens(self.model, encoded, tokens, views=tuple(LENS_VIEWS))
                rows = frame.assign(example_id=example.example_id, task=example.task).to_dict("records")
            return {**status, "rows": rows}

        return self._frames(run_cached(examples, compute, self.cache_dir, key, shard, desc="logit lens"), LENS_COLUMNS)

    @staticmethod
    def _frames(results: list[dict[str, Any]], columns: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        status = pd.DataFrame([{k: v for k, v in r.items() if k not in ("rows", "example_digest")} for r in results])
        rows = [row for r in results for row in r["rows"]]
        return (pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))), status
