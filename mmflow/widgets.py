"""Widgets: explore layer windows (knockout) and layers (logit lens) on the fly; a static figure under papermill.

Sliders update on release (``continuous_update=False``), so the figure always shows the slider's current setting;
a status line says "computing..." while a setting runs and what the figure shows once it is drawn.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import pandas as pd

from mmflow.cache import interactive_frontend
from mmflow.data import Example
from mmflow.figures import YLABEL_CHANGE, plot_patch_overlay
from mmflow.knockout import knockout_sweep
from mmflow.lens import ANSWER, FALSE_OPTION, LENS_VIEWS, WITH_NORM, answer_token_ids, logit_lens, token_label
from mmflow.paper import window_layers
from mmflow.runs import Run
from mmflow.styles import layer_axis, line_style

#: The y axis of a knockout curve spans at least this many percentage points, so noise is not magnified.
MIN_SPAN_PP = 2.0


def _at_least(ax: Any, low: float, high: float, span: float) -> None:
    """Widen the y axis to at least ``span`` around the data, without an offset that magnifies noise."""
    if high - low < span:
        middle = (high + low) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


class _Explorer:
    """Task and example pickers, the full question, a status line and an output area; subclasses add controls
    and implement :meth:`compute` and :meth:`draw`.

    ``rows``: an analysis' rows (with ``example_id``); a setting they hold is read from them, not recomputed, and
    the pickers start on the first example they hold (so a notebook run after ``make sweep`` computes nothing).
    """

    def __init__(self, run: Run, examples: Sequence[Example], rows: pd.DataFrame | None = None):
        import ipywidgets as widgets

        self.run, self.examples = run, list(examples)
        self.rows = rows if rows is not None and len(rows) else None
        self.known = set() if self.rows is None else set(self.rows.example_id)
        tasks = list(dict.fromkeys(e.task for e in self.examples))
        first = next((e.task for e in self.examples if e.example_id in self.known), tasks[0])
        self.task = widgets.Dropdown(options=tasks, value=first, description="task")
        self.example = widgets.Dropdown(description="example", layout=widgets.Layout(width="420px"))
        self.question = widgets.HTML()
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: pd.DataFrame | None = None
        self._sync_examples()
        self.task.observe(lambda _: self._sync_examples(), names="value")

    def _sync_examples(self) -> None:
        options = [
            (f"{e.example_id}: {e.question}", i) for i, e in enumerate(self.examples) if e.task == self.task.value
        ]
        self.example.options = options
        self.example.value = next((i for _, i in options if self.examples[i].example_id in self.known), options[0][1])

    def known_rows(self, example: Example, **match: Any) -> pd.DataFrame | None:
        """The rows of ``example`` whose columns equal ``match``, if the analysis holds them; else None."""
        if example.example_id not in self.known:
            return None
        rows = self.rows[self.rows.example_id == example.example_id]
        for column, value in match.items():
            rows = rows[rows[column] == value]
        return rows if len(rows) else None

    def _layout(self, *controls: Any) -> None:
        """The panel: the subclass's controls, the pickers, the question, the status line and the figure."""
        import ipywidgets as widgets

        self.panel = widgets.VBox(
            [
                widgets.HBox(list(controls)),
                widgets.HBox([self.task, self.example]),
                self.question,
                self.status,
                self.output,
            ]
        )

    def _watch(self, *controls: Any) -> None:
        for control in controls:
            control.observe(lambda _: self.update(), names="value")

    @property
    def current(self) -> Example:
        """The example picked."""
        return self.examples[self.example.value]

    def update(self, live: bool = True) -> pd.DataFrame:
        """Compute the current setting and (``live``) redraw it in the panel; returns its rows."""
        example = self.current
        self.question.value = (
            f"<b>{example.task}</b> {example.example_id}: {example.question} (answer: {example.answer})"
        )
        self.status.value = "<i>computing...</i>"
        self.result = self.compute(example)
        if live:
            self.output.clear_output(wait=True)
            with self.output:
                self.draw(example)
        self.status.value = f"<b>{self.title(example)}</b>: {self.describe()}"
        return self.result

    def show(self) -> None:
        """Display the panel in a live frontend; headless (papermill, nbconvert) show the first setting statically."""
        from IPython.display import display

        if interactive_frontend():
            display(self.panel)
            self.update()
        else:  # one static figure in the cell's own output
            self.update(live=False)
            self.draw(self.current)

    def compute(self, example: Example) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def draw(self, example: Example) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def title(self, example: Example) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class KnockoutExplorer(_Explorer):
    """Window size, centre layers, flow, task and example; re-runs the fast knockout for the setting and draws the
    example's patch groups beside the curve. Every window size is offered, even ones included (an even window has
    no middle layer: it reaches k/2 layers below its centre and k/2 - 1 above), and the panel starts on the
    notebook's ``window``, so its first figure is the notebook's setting.

    Example::

        KnockoutExplorer(run, examples, ["Question->Last"], window=3).show()
    """

    def __init__(
        self,
        run: Run,
        examples: Sequence[Example],
        flows: Sequence[str],
        window: int,
        rows: pd.DataFrame | None = None,
    ):
        import ipywidgets as widgets

        super().__init__(run, examples, rows)
        n_layers = run.n_layers
        self.window = widgets.IntSlider(
            value=min(window, n_layers), min=1, max=n_layers, step=1, description="window k", continuous_update=False
        )
        self.layers = widgets.IntRangeSlider(
            value=(0, n_layers - 1), min=0, max=n_layers - 1, description="centres", continuous_update=False
        )
        self.flow = widgets.Dropdown(options=list(flows), value=flows[0], description="flow")
        self._watch(self.window, self.layers, self.flow, self.example)
        self._layout(self.window, self.layers, self.flow)

    def compute(self, example: Example) -> pd.DataFrame:
        """The fast engine's sweep for the current setting (read from the analysis' rows if they hold it)."""
        lo, hi = self.layers.value
        known = self.known_rows(example, flow=self.flow.value, k=self.window.value)
        if known is not None and set(range(lo, hi + 1)) <= set(known.layer):
            return known[known.layer.between(lo, hi)].reset_index(drop=True)
        encoded = self.run.encode(example, patches=True)
        sweep = knockout_sweep(
            self.run.model, encoded, [self.flow.value], self.window.value, "fast", layers=range(lo, hi + 1)
        )
        return sweep.assign(example_id=example.example_id, task=example.task)

    def title(self, example: Example) -> str:
        """The setting, each part once: task, example, flow, window k and the centre layers."""
        lo, hi = self.layers.value
        centres = f"centre layer {lo}" if lo == hi else f"centre layers {lo}-{hi}"
        return f"{example.task} {example.example_id}: {self.flow.value}, k={self.window.value}, {centres}"

    def describe(self) -> str:
        """What a window covers, shown on the middle of the chosen centres (the title names k, flow and range)."""
        k, n = self.window.value, self.run.n_layers
        lo, hi = self.layers.value
        middle = (lo + hi) // 2
        window = window_layers(middle, k, n)
        around = f"{k // 2} layer(s) on each side" if k % 2 else f"{k // 2} layer(s) below and {k // 2 - 1} above"
        return (
            f"each window is its centre layer l and {around} (at l={middle}: layers {window.start}-"
            f"{window.stop - 1}), truncated at the model's first and last layers"
        )

    def draw(self, example: Example) -> Any:
        """The example's patch groups and the knockout curve of the current setting (in the flow's style)."""
        import matplotlib.pyplot as plt

        fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(10, 3.6))
        plot_patch_overlay(self.run.model, self.run.processor, example, ax_img, self.run.inputs)
        change = self.result["rel_change"].round(3)  # 1e-3 pp: the same drawing across machines' float rounding
        ax_curve.plot(self.result["layer"], change, label=self.flow.value, **line_style(self.flow.value))
        ax_curve.axhline(0, color="grey", lw=0.6)
        _at_least(ax_curve, float(min(change.min(), 0)), float(max(change.max(), 0)), MIN_SPAN_PP)
        layer_axis(ax_curve, sorted(self.result["layer"]), "centre layer")
        ax_curve.set_ylabel(YLABEL_CHANGE)
        ax_curve.set_title(textwrap.fill(self.title(example), 60), fontsize=9)
        fig.tight_layout()
        plt.show()
        return fig


class LensExplorer(_Explorer):
    """Logit lens of one example: the view (final norm, raw, the paper's code), the layer range, task and example;
    draws the probability of the lowercase and Capitalized answer (and false option) per layer.

    Example::

        LensExplorer(run, examples).show()
    """

    def __init__(self, run: Run, examples: Sequence[Example], rows: pd.DataFrame | None = None):
        import ipywidgets as widgets

        super().__init__(run, examples, rows)
        n_layers = run.n_layers
        self.view = widgets.Dropdown(
            options=[(label, key) for key, label in LENS_VIEWS.items()],
            value="final_norm",
            description="view",
            layout=widgets.Layout(width="420px"),
        )
        self.layers = widgets.IntRangeSlider(
            value=(-1, n_layers - 1), min=-1, max=n_layers - 1, description="layers", continuous_update=False
        )
        self._watch(self.view, self.layers, self.example)
        self._layout(self.view, self.layers)

    def compute(self, example: Example) -> pd.DataFrame:
        """The lens rows of the current view, within the layer range (from the analysis' rows if they hold them)."""
        lo, hi = self.layers.value
        known = self.known_rows(example, view=LENS_VIEWS[self.view.value])
        if known is not None:
            return known[known.layer.between(lo, hi)].reset_index(drop=True)
        tok = self.run.processor.tokenizer
        tokens = {token_label(ANSWER, form): tid for form, tid in answer_token_ids(tok, example.answer).items()}
        if example.false_option:
            tokens |= {token_label(FALSE_OPTION, f): t for f, t in answer_token_ids(tok, example.false_option).items()}
        rows = logit_lens(self.run.model, self.run.encode(example), tokens, views=[self.view.value])
        return rows[(rows.layer >= lo) & (rows.layer <= hi)].assign(example_id=example.example_id, task=example.task)

    def title(self, example: Example) -> str:
        """The setting, each part once: task, example, view and the layers drawn (those the view has)."""
        layers = sorted(self.result.layer.unique()) if self.result is not None and len(self.result) else []
        shown = f", layers {layers[0]}-{layers[-1]}" if layers else ", no layer in range"
        return f"{example.task} {example.example_id}: {LENS_VIEWS[self.view.value]}{shown}"

    def describe(self) -> str:
        """What the figure shows (the title names the view and the layers)."""
        note = "" if self.view.value == "final_norm" else f"; the verdict uses the view '{WITH_NORM}'"
        return f"probability of the answer's (and false option's) lowercase and Capitalized forms per layer{note}"

    def draw(self, example: Example) -> Any:
        """Probability per layer of each tracked token, in the tokens' styles; the x label explains layer -1 only
        where the view has it."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.4))
        for i, (token, curve) in enumerate(self.result.groupby("token", sort=False)):
            ax.plot(curve["layer"], curve["prob"], markersize=4, label=token, **line_style(token, i))
        layers = sorted(self.result["layer"].unique())
        layer_axis(ax, layers, "layer (-1: embeddings)" if layers and layers[0] == -1 else "layer")
        ax.set(ylabel="probability", ylim=(0, 1))
        ax.set_title(textwrap.fill(self.title(example), 70), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        plt.show()
        return fig


class ModelSwitchExplorer(KnockoutExplorer):
    """The knockout explorer with a model switch (notebook 6): the model, the flow, the window size and centres,
    the task and the example. Switching the model swaps the loaded run, its examples and its analysis rows, and puts
    the window on that model's own k and the centres on all of its layers.

    Example::

        ModelSwitchExplorer(studies, rows, ["Question->Last"]).show()  # rows[model][figure]: the analyses' rows
    """

    def __init__(self, studies: Sequence[Any], rows: dict[str, pd.DataFrame], flows: Sequence[str]):
        import ipywidgets as widgets

        self.studies = {study.run.name: study for study in studies}
        self.model_rows = rows
        first = studies[0]
        super().__init__(first.run, first.examples, flows, first.k, rows.get(first.run.name))
        self.model = widgets.Dropdown(options=list(self.studies), value=first.run.name, description="model")
        self.model.observe(lambda _: self.switch(), names="value")
        self._layout(self.model, self.window, self.layers, self.flow)
        self._switching = False

    def update(self, live: bool = True) -> pd.DataFrame | None:
        """As :meth:`KnockoutExplorer.update`, except while the model switch reconfigures the controls."""
        if getattr(self, "_switching", False):
            return None
        return super().update(live)

    def switch(self) -> None:
        """Load the chosen model's run, examples and rows into the panel, then draw its first kept example."""
        study = self.studies[self.model.value]
        self._switching = True
        try:
            self.run, self.examples = study.run, list(study.examples)
            rows = self.model_rows.get(study.run.name)
            self.rows = rows if rows is not None and len(rows) else None
            self.known = set() if self.rows is None else set(self.rows.example_id)
            n_layers = study.n_layers
            self.window.max = max(self.window.max, n_layers)  # widen first: value must stay within the bounds
            self.window.value = min(study.k, n_layers)
            self.window.max = n_layers
            self.layers.max = max(self.layers.max, n_layers - 1)
            self.layers.value = (0, n_layers - 1)
            self.layers.max = n_layers - 1
            tasks = list(dict.fromkeys(e.task for e in self.examples))
            self.task.options = tasks
            self.task.value = next((e.task for e in self.examples if e.example_id in self.known), tasks[0])
            self._sync_examples()
        finally:
            self._switching = False
        self.update()

    def title(self, example: Example) -> str:
        """The model, then the setting (see :meth:`KnockoutExplorer.title`)."""
        return f"{self.run.name} (L={self.run.n_layers}): {super().title(example)}"
