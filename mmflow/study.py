"""``Study``: what every analysis notebook shares, built from its ``parameters`` cell.

A notebook keeps only what is particular to its question::

    study = Study.from_params(model="shapes-llava", data="shapes", n_per_task=None, window=None)
    rows = study.knockout(TO_LAST_FLOWS, FIG_TO_LAST)  # shows and saves the per-task accounting of the examples
    table = study.stable(curve_table(rows), FIG_TO_LAST)
    study.figure(plot_curves(table, title=study.title("flows to the last position"), panels=study.tasks), table,
                 FIG_TO_LAST)
    study.explore(TO_LAST_FLOWS)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.cache import CACHE_DIR_ENV, progress_note
from mmflow.data import EMBEDDED_DATA, Example, load_examples
from mmflow.engines import block_mask
from mmflow.errors import MmflowError
from mmflow.figures import (
    FIG_CASING,
    FIG_IMAGE_TO_QUESTION,
    FIG_PATCH_GROUPS,
    FIG_TO_LAST,
    record_provenance,
    save_figure,
    stable_table,
)
from mmflow.inputs import Encoded
from mmflow.knockout import check_window, flow_positions
from mmflow.lens import LENS_VIEWS
from mmflow.models import LlavaModel, check_dtype_device
from mmflow.paper import IMAGE_TO_QUESTION, PATCH_FLOWS, TASKS, TO_LAST_FLOWS, Flow, default_window, window_layers
from mmflow.params import check_engine, check_keep, resolve_inputs
from mmflow.runs import Run, check_writable_folder
from mmflow.tables import example_table, wrong_answers

#: Questions per task in a smoke run (the tests' quick pass through every notebook).
SMOKE_PER_TASK = 2
#: What each analysis notebook computes, by its figure: ``(kind, flows)``. ``make sweep`` computes exactly these.
ANALYSES = {
    FIG_TO_LAST: ("knockout", TO_LAST_FLOWS),
    FIG_IMAGE_TO_QUESTION: ("knockout", (IMAGE_TO_QUESTION,)),
    FIG_PATCH_GROUPS: ("knockout", PATCH_FLOWS),
    FIG_CASING: ("lens", ()),
}


def _check_params(
    tasks: Sequence[str], n_per_task: Any, window: Any, engine: str, dtype: str, device: str, keep: str
) -> None:
    if isinstance(tasks, str) or not tasks or any(t not in TASKS for t in tasks):
        raise MmflowError(f"tasks must be a non-empty list of {list(TASKS)}, got {tasks!r}")
    if n_per_task is not None and (isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1):
        raise MmflowError(
            f"n_per_task must be a positive integer or None (all rows on GQA, 40 on shapes), got {n_per_task!r}"
        )
    if window is not None:
        check_window(window)
    check_engine(engine)
    check_dtype_device(dtype, device)
    check_keep(keep)


@dataclass
class Study:
    """A loaded model, the examples and the settings of one notebook's analysis."""

    run: Run
    examples: list[Example]
    k: int
    engine: str
    out_dir: Path
    data: str
    tasks: list[str]
    keep: str = "correct"
    status: pd.DataFrame | None = None
    #: quiet: the accounting of each analysis is kept in :attr:`accounts` only, not shown or saved (notebook 6)
    quiet: bool = False
    accounts: dict[str, pd.DataFrame] = field(default_factory=dict)  #: the per-task accounting by analysis

    @classmethod
    def from_params(
        cls,
        model: str = "shapes-llava",
        data: str = EMBEDDED_DATA,
        images: str = "",
        tasks: Sequence[str] = TASKS,
        n_per_task: int | None = None,
        window: int | None = None,
        engine: str = "fast",
        device: str = "cpu",
        dtype: str = "float32",
        out_dir: str = "../results/figures",
        cache_dir: str = "../results",
        smoke: bool = False,
        inputs: str | None = None,
        keep: str = "correct",
    ) -> Study:
        """Load the model and the examples named by a notebook's parameters.

        Args:
            model: ``"shapes-llava"``, a hub id or a checkpoint folder.
            data: ``"shapes"`` or a folder of the paper's GQA CSVs.
            images: the GQA image folder.
            tasks: which tasks.
            n_per_task: questions per task; None: 40 on shapes, every row on GQA.
            window: window size k; None: the paper's rule for the model's depth.
            engine: knockout engine (see :data:`~mmflow.engines.ENGINES`).
            device: torch device.
            dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
            out_dir: where figures are written.
            cache_dir: the results cache (``$MMFLOW_CACHE_DIR``, which ``make reproduce CACHE=...`` sets, comes first).
            smoke: a tiny run (2 questions per task) for tests.
            inputs: ``"paper"`` (the official prompt and pad-to-square) or ``"processor"``; None: paper for real
                checkpoints, processor for the embedded shapes-llava.
            keep: ``"correct"`` (the paper's filter: analyse correctly answered examples) or ``"all"``.

        Raises:
            MmflowError: naming the first bad parameter.
        """
        _check_params(tasks, n_per_task, window, engine, dtype, device, keep)
        resolve_inputs(inputs, model)  # bad values, folders and data fail before the model loads
        cache_dir = os.environ.get(CACHE_DIR_ENV) or cache_dir  # make reproduce CACHE=... (not recorded)
        check_writable_folder(out_dir, "out_dir")
        check_writable_folder(cache_dir, "cache_dir")
        examples = load_examples(data, images or None, tasks, SMOKE_PER_TASK if smoke else n_per_task)
        run = Run.load(model, device=device, dtype=dtype, cache_dir=cache_dir, inputs=inputs)
        k = default_window(run.n_layers) if window is None else window
        return cls(run, examples, k, engine, Path(out_dir), data, list(tasks), keep)

    @property
    def model(self) -> LlavaModel:
        """The loaded model."""
        return self.run.model

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model."""
        return self.run.n_layers

    def __repr__(self) -> str:
        per_task = pd.Series([e.task for e in self.examples]).value_counts()
        counts = (
            f"{per_task.iloc[0]} per task" if per_task.nunique() == 1 else "per task " + per_task.to_dict().__repr__()
        )
        return (
            f"{self.run.name}: {self.n_layers} layers, window k={self.k}, {len(self.examples)} examples "
            f"({counts}) from {self.data}; inputs={self.run.inputs!r}, keep={self.keep!r}"
        )

    def title(self, what: str, window: bool = True) -> str:
        """A figure title naming the model, ``what`` it shows (the flows or the lens view) and (``window``) the
        window k, which the logit lens does not have.

        Example:
            >>> from types import SimpleNamespace as NS
            >>> Study.title(NS(run=NS(name="m"), k=3), "Image->Question")
            'm: Image->Question, k=3'
        """
        return f"{self.run.name}: {what}, k={self.k}" if window else f"{self.run.name}: {what}"

    def encode(self, example: Example, patches: bool = True) -> Encoded:
        """An example's input and token groups (with patch groups by default)."""
        return self.run.encode(example, patches)

    def _account(self, rows: pd.DataFrame, status: pd.DataFrame, name: str) -> pd.DataFrame:
        """Show and save (``out_dir/<name>_examples.csv``) what happened to every example; name empty tasks."""
        from IPython.display import Markdown, display

        self.status = status
        table = example_table(status, rows, self.tasks)
        self.accounts[name] = table
        if self.quiet:
            return rows
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(self.out_dir / f"{name}_examples.csv", index=False)
        display(table)
        wrong = wrong_answers(status)
        if len(wrong):
            display(Markdown(f"Examples not kept ({(~status.correct.astype(bool)).sum()}; the first {len(wrong)}):"))
            display(wrong)
        empty = table.task[table.kept == 0].tolist()
        if rows.empty:
            display(Markdown(f"**No kept examples** (keep={self.keep!r}): nothing to plot; the figure says so."))
        elif empty:
            display(Markdown(f"**No kept examples** for {', '.join(empty)}: their panels say so."))
        return rows

    def knockout(self, flows: Sequence[Flow], name: str) -> pd.DataFrame:
        """Knockout sweeps over the kept examples (cached); shows and saves the per-task table as
        ``<name>_examples.csv``. An empty result is shown, not raised, so the notebook still writes its figure."""
        return self._account(*self.run.knockout(self.examples, flows, self.k, self.engine, keep=self.keep), name)

    def analyse(self, name: str) -> pd.DataFrame:
        """The analysis of figure ``name`` as :data:`ANALYSES` declares it (what ``make sweep`` precomputes)."""
        kind, flows = ANALYSES[name]
        return self.knockout(flows, name) if kind == "knockout" else self.lens(name)

    def analyse_together(self, names: Sequence[str] = tuple(ANALYSES)) -> dict[str, pd.DataFrame]:
        """The analyses of figures ``names`` (default: all of :data:`ANALYSES`) as :meth:`analyse` gives each, but
        computed example by example (:meth:`~mmflow.runs.Run.analyses`: an example is encoded once and its clean run
        made once for all its knockouts; the same rows and cache files)."""
        found = self.run.analyses(self.examples, [ANALYSES[n] for n in names], self.k, self.engine, keep=self.keep)
        return {name: self._account(rows, status, name) for name, (rows, status) in zip(names, found)}

    def lens(self, name: str) -> pd.DataFrame:
        """Logit-lens rows of the kept examples (cached); shows and saves the per-task table (see :meth:`knockout`)."""
        return self._account(*self.run.lens(self.examples, keep=self.keep), name)

    def one_knockout(self, rows: pd.DataFrame, flow: str, centre: int) -> str:
        """The method on one example, read from an analysis' rows (no model forward): the first kept example with a
        ``flow`` sweep, the edges its window around ``centre`` cuts, and the answer's probability before and after.
        Returns Markdown."""
        held = rows[(rows.flow == flow) & (rows.layer == centre)] if len(rows) else rows
        if not len(held):
            return f"No kept example has a {flow} sweep: nothing to show."
        row = held.iloc[0]
        example = next(e for e in self.examples if e.example_id == row.example_id)
        encoded = self.encode(example)
        sources, targets = flow_positions(flow, encoded.groups, encoded.length)
        cut = block_mask([(targets, sources)], encoded.length, encoded.length)  # rows: queries, columns: keys
        layers = window_layers(centre, self.k, self.n_layers)
        answer = self.run.processor.tokenizer.decode([int(row.answer_token)])
        return (
            f"**{example.task} {example.example_id}**: {example.question} -> {answer!r}, p = {row.p_base:.3f}\n\n"
            f"{flow} cut: {len(targets)} target x {len(sources)} source positions = {int(cut.sum())} edges, in "
            f"layers {layers.start}-{layers.stop - 1}: p = {row.p_new:.3f} ({row.rel_change:+.1f}%)"
        )

    def one_lens(self, rows: pd.DataFrame, views: Sequence[str] = ("final_norm", "paper")) -> pd.DataFrame:
        """The logit lens of the first kept example, read from the analysis' rows (no model forward): probability per
        layer of each tracked token in ``views`` (keys of :data:`~mmflow.lens.LENS_VIEWS`); prints its question."""
        if not len(rows):
            print("No kept example: nothing to show.")
            return pd.DataFrame()
        first = rows[rows.example_id == rows.example_id.iloc[0]]
        example = next(e for e in self.examples if e.example_id == first.example_id.iloc[0])
        print(f"{example.task} {example.example_id}: {example.question} (answer: {example.answer})")
        first = first[first.view.isin([LENS_VIEWS[v] for v in views])]
        return first.pivot(index="layer", columns=["view", "token"], values="prob").round(3)

    def stable(self, table: pd.DataFrame, name: str) -> pd.DataFrame:
        """The figure data already saved as ``name`` if this run agrees with it within the stated tolerance, else
        ``table`` (see :func:`~mmflow.figures.stable_table`)."""
        return stable_table(table, self.out_dir, name)

    def figure(self, fig: Any, data: pd.DataFrame, name: str) -> None:
        """Save a figure with its data as ``out_dir/name``.png/.pdf/.csv, note its provenance, and show it (returns
        nothing, so a notebook cell ending with it prints no list of paths)."""
        import matplotlib.pyplot as plt

        save_figure(fig, data, self.out_dir, name)
        record_provenance(
            self.out_dir,
            name,
            model=self.run.name,
            data=self.data,
            examples=len(self.examples),
            tasks=self.tasks,
            k=self.k,
            n_layers=self.n_layers,
            inputs=self.run.inputs,
            keep=self.keep,
            model_identity=self.run.identity.sha256 if self.run.identity else None,
        )
        plt.show()

    def explore(self, flows: Sequence[str], rows: pd.DataFrame | None = None) -> None:
        """The knockout explorer for these flows (a static figure when run headless); settings that ``rows`` (the
        analysis' rows) hold are read from them. Then reports what the notebook computed (see
        :meth:`report_computed`)."""
        from mmflow.widgets import KnockoutExplorer

        KnockoutExplorer(self.run, self.examples, list(flows), self.k, rows).show()
        self.report_computed()

    def explore_lens(self, rows: pd.DataFrame | None = None) -> None:
        """The logit-lens explorer (a static figure when run headless), reading ``rows`` where they hold the
        setting; then reports what the notebook computed."""
        from mmflow.widgets import LensExplorer

        LensExplorer(self.run, self.examples, rows).show()
        self.report_computed()

    def report_computed(self) -> None:
        """Print in the terminal of ``make reproduce`` how many model forwards and decoder-layer calls this notebook
        has made (zero after ``make sweep``: everything is read from the cache)."""
        progress_note(f"{self.run.name}: {self.run.describe_computed()}")
