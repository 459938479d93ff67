"""Experiments over many examples: the paper's correctness filter and :class:`Run`, which analyses examples through
the results cache (:mod:`mmflow.cache`) and accounts for every one of them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mmflow.cache import ResultCache, check_unique_ids, config_key, run_cached, run_cached_together
from mmflow.checkpoints import locate
from mmflow.data import Example
from mmflow.errors import MmflowError
from mmflow.fast import Clean
from mmflow.identity import Identity, model_identity
from mmflow.inputs import Encoded, encode_example
from mmflow.knockout import check_flows, check_window, clean_run_for, first_target, has_empty_group, knockout_sweep
from mmflow.lens import ANSWER, FALSE_OPTION, LENS_VIEWS, answer_token_ids, logit_lens, token_label
from mmflow.models import (
    EMBEDDED_MODEL,
    REPO_DIR,
    LlavaModel,
    check_dtype_device,
    decoder_layers,
    load_model,
    num_layers,
)
from mmflow.paper import Flow, default_window, flow_name, flows_need_patches
from mmflow.params import KEEP, check_keep, resolve_inputs  # noqa: F401 (KEEP re-exported)

DEFAULT_CACHE_DIR = REPO_DIR / "results"
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


def model_fingerprint(model: LlavaModel, identity: Identity) -> str:
    """Identify a model for cache keys: its loaded config (without local paths) and the SHA-256 identity of every
    file of its checkpoint (:mod:`mmflow.identity`), so the same files in two folders share results and any changed
    byte (weights, config, processor, tokenizer, chat template) gets new ones."""
    config = json.dumps(_without_paths(model.config.to_dict()), sort_keys=True, default=str)
    return f"{config}|files:{identity.sha256}"


def check_writable_folder(folder: str | Path, parameter: str) -> Path:
    """Check that ``folder`` is a writable folder, or can be created (nothing is created here).

    Raises:
        MmflowError: naming the parameter and the path.
    """
    path = Path(folder).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise MmflowError(f"{parameter} {str(folder)!r} ({path}) is not a folder")
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise MmflowError(f"{parameter} {str(folder)!r} ({path}) is not writable ({err.strerror})") from None
        return path
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a folder" if not parent.is_dir() else "is not writable"
        raise MmflowError(f"{parameter} {str(folder)!r} ({path}) cannot be created: {parent} {why}")
    return path


#: One analysis over examples for :func:`~mmflow.cache.run_cached_together`: ``(cache key, compute, progress label)``.
Job = tuple[str, Callable[[Example, str], dict[str, Any]], str]


@dataclass
class _Reuse:
    """What the analyses of :meth:`Run.analyses` share about the example at hand: its encodings (with and without
    patch groups) and one clean run, kept from the first target of any of their flows."""

    flows: list[Flow]
    digest: str = ""
    encoded: dict[bool, Encoded] = field(default_factory=dict)
    clean: tuple[dict[str, torch.Tensor], Clean] | None = None

    def at(self, digest: str) -> _Reuse:
        """This, holding nothing of another example than ``digest``'s."""
        if digest != self.digest:
            self.digest, self.encoded, self.clean = digest, {}, None
        return self


def _same_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


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
    #: what this run has computed with its model: model forwards and decoder-layer calls (the fast engine runs
    #: decoder layers itself), counted by hooks; zero when everything came from the cache
    computed: dict[str, int] = field(default_factory=lambda: {"forwards": 0, "layer_calls": 0}, repr=False)
    #: the SHA-256 identity of the checkpoint's files (see :mod:`mmflow.identity`)
    identity: Identity | None = None
    _reuse: _Reuse | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        def count(what: str):
            def hook(module, args):
                self.computed[what] += 1

            return hook

        self.model.register_forward_pre_hook(count("forwards"))
        for layer in decoder_layers(self.model):
            layer.register_forward_pre_hook(count("layer_calls"))

    def describe_computed(self) -> str:
        """What this run has computed with its model, e.g. ``"model forwards: 0, decoder-layer calls: 0"``."""
        return f"model forwards: {self.computed['forwards']}, decoder-layer calls: {self.computed['layer_calls']}"

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

        Raises:
            MmflowError: for a bad parameter (model, device, dtype, cache_dir, inputs), before any weight loads.
        """
        mode = resolve_inputs(inputs, name)
        check_dtype_device(dtype, device)
        cache = str(check_writable_folder(cache_dir or DEFAULT_CACHE_DIR, "cache_dir"))
        located = locate(name)
        model, processor = load_model(name, device, dtype)
        identity = model_identity(located, cache)
        fingerprint = model_fingerprint(model, identity)
        return cls(name, model, processor, device, dtype, cache, fingerprint, mode, identity=identity)

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model."""
        return num_layers(self.model)

    def encode(self, example: Example, patches: bool = False) -> Encoded:
        """Encode an example for this model (with its patch groups if ``patches``)."""
        return encode_example(
            self.processor, example, self.device, getattr(torch, self.dtype), self.model, self.inputs, patches=patches
        )

    def _check(self, example: Example, encoded: Encoded, digest: str) -> dict[str, Any]:
        """The example's status with the model's greedy answer, generated once per (model, dtype, inputs) and
        example, and shared by every analysis through the cache."""
        key = config_key(kind="answer", model=self.fingerprint, dtype=self.dtype, inputs=self.inputs)
        cache = ResultCache(self.cache_dir, f"answers-{key}")
        answer = cache.read(digest)
        if answer is None:
            predicted = greedy_answer(self.model, self.processor, encoded).strip()
            answer = cache.write(digest, {"predicted": predicted, "rows": []})
        return {
            **_status(example),
            "predicted": answer["predicted"],
            "correct": is_correct(answer["predicted"], example.answer),
            "error": None,
            "located": encoded.located,
        }

    def _encode_or_record(self, example: Example, digest: str, patches: bool) -> tuple[Encoded | None, dict[str, Any]]:
        """The example's encoding and status; an example that cannot be encoded is recorded with the reason."""
        try:
            if self._reuse is None:
                encoded = self.encode(example, patches)
            else:
                reuse = self._reuse.at(digest)
                if patches not in reuse.encoded:
                    reuse.encoded[patches] = self.encode(example, patches)
                encoded = reuse.encoded[patches]
        except MmflowError as err:
            return None, {**_status(example), "predicted": None, "correct": False, "error": str(err), "located": {}}
        return encoded, self._check(example, encoded, digest)

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
        key, compute, desc = self._knockout_job(examples, flows, window, engine, keep)
        return self._frames(run_cached(examples, compute, self.cache_dir, key, shard, desc=desc), KNOCKOUT_COLUMNS)

    def _knockout_job(
        self, examples: Sequence[Example], flows: Sequence[Flow], window: int | None, engine: str, keep: str
    ) -> Job:
        check_keep(keep)
        check_flows(flows)
        k = default_window(self.n_layers) if window is None else check_window(window)
        names = [flow_name(f) for f in flows]
        key = "knockout-" + config_key(
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

        def compute(example: Example, digest: str) -> dict[str, Any]:
            encoded, status = self._encode_or_record(example, digest, patches)
            if encoded is None:
                return {**status, "skipped_flows": [], "rows": []}
            skipped = [name for name, f in zip(names, flows) if has_empty_group(f, encoded.groups)]
            rows = []
            if (status["correct"] or keep == "all") and len(skipped) < len(flows):
                usable = [f for name, f in zip(names, flows) if name not in skipped]
                clean = self._reused_clean(encoded, usable, engine)
                sweep = knockout_sweep(self.model, encoded, usable, k, engine, clean=clean)
                rows = sweep.assign(example_id=example.example_id, task=example.task).to_dict("records")
            return {**status, "skipped_flows": skipped, "rows": rows}

        return key, compute, "knockout"

    def _reused_clean(self, encoded: Encoded, flows: Sequence[Flow], engine: str) -> Clean | None:
        """Within :meth:`analyses`: the example's shared clean run (made, or made again from an earlier position,
        when this sweep needs hidden states from before where it keeps them); else None (the sweep makes its own)."""
        reuse = self._reuse
        if reuse is None:
            return None
        needed = first_target(flows, encoded)
        if needed is None:  # no flow resolves: the sweep says why
            return None
        held = reuse.clean
        if held is None or held[1].keep_from > needed or not _same_inputs(held[0], encoded.inputs):
            keep_from = first_target(reuse.flows, encoded)  # never after needed: these flows are among them
            keep_from = needed if keep_from is None else min(keep_from, needed)
            reuse.clean = (encoded.inputs, clean_run_for(self.model, encoded, engine, keep_from))
        return reuse.clean[1]

    def lens(
        self, examples: Sequence[Example], shard: tuple[int, int] = (0, 1), keep: str = "correct"
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Logit lens in every view of :data:`~mmflow.lens.LENS_VIEWS` for the lowercase/Capitalized answer and
        false option.

        Returns:
            ``(rows, status)`` as in :meth:`knockout`; rows have ``view, layer, token, token_id, prob``.
        """
        check_unique_ids(examples)
        key, compute, desc = self._lens_job(keep)
        return self._frames(run_cached(examples, compute, self.cache_dir, key, shard, desc=desc), LENS_COLUMNS)

    def _lens_job(self, keep: str) -> Job:
        check_keep(keep)
        key = "lens-" + config_key(kind="lens", model=self.fingerprint, dtype=self.dtype, inputs=self.inputs, keep=keep)
        tok = self.processor.tokenizer

        def compute(example: Example, digest: str) -> dict[str, Any]:
            encoded, status = self._encode_or_record(example, digest, False)
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

        return key, compute, "logit lens"

    def analyses(
        self,
        examples: Sequence[Example],
        specs: Sequence[tuple[str, Sequence[Flow]]],
        window: int | None = None,
        engine: str = "fast",
        shard: tuple[int, int] = (0, 1),
        keep: str = "correct",
    ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
        """Several analyses, each ``("knockout", flows)`` or ``("lens", ())``, example by example: while an example
        is at hand it is encoded once (per kind of groups) and its clean run is made once, for all its knockouts.
        Each analysis' rows, status and cache files are those :meth:`knockout` or :meth:`lens` give it alone
        (tested, bit for bit).

        Returns:
            Per analysis, ``(rows, status)``.

        Raises:
            MmflowError: for an unknown kind, and what :meth:`knockout` and :meth:`lens` raise.
        """
        check_unique_ids(examples)
        unknown = [kind for kind, _ in specs if kind not in ("knockout", "lens")]
        if unknown:
            raise MmflowError(f"An analysis is a 'knockout' or a 'lens', got {unknown[0]!r}")
        jobs = [
            self._knockout_job(examples, flows, window, engine, keep) if kind == "knockout" else self._lens_job(keep)
            for kind, flows in specs
        ]
        self._reuse = _Reuse([f for kind, flows in specs if kind == "knockout" for f in flows])
        try:
            results = run_cached_together(examples, jobs, self.cache_dir, shard)
        finally:
            self._reuse = None
        return [
            self._frames(found, KNOCKOUT_COLUMNS if kind == "knockout" else LENS_COLUMNS)
            for (kind, _), found in zip(specs, results)
        ]

    @staticmethod
    def _frames(results: list[dict[str, Any]], columns: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        status = pd.DataFrame([{k: v for k, v in r.items() if k not in ("rows", "example_digest")} for r in results])
        rows = [row for r in results for row in r["rows"]]
        return (pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))), status
