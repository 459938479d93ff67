"""Widgets: explore layer windows on the fly with the fast engine; a static figure under papermill."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from mmflow.data import Example
from mmflow.figures import YLABEL_CHANGE, plot_patch_overlay
from mmflow.knockout import knockout_sweep
from mmflow.runs import Run


def interactive_frontend() -> bool:
    """True in a kernel started by a Jupyter server (JupyterLab/Notebook) or VS Code, False under papermill."""
    return any(name in os.environ for name in ("JPY_SESSION_NAME", "VSCODE_PID"))


class KnockoutExplorer:
    """An ipywidgets panel: window size, layer range, flow, task and example pickers, re-running the fast
    knockout for the chosen setting and redrawing the curve and the example's patch groups.

    Example::

        KnockoutExplorer(run, examples, ["Question->Last"], window=3).show()
    """

    def __init__(self, run: Run, examples: Sequence[Example], flows: Sequence[str], window: int):
        import ipywidgets as widgets

        self.run, self.examples = run, list(examples)
        n_layers = run.n_layers
        tasks = list(dict.fromkeys(e.task for e in self.examples))
        self.window = widgets.IntSlider(value=window, min=1, max=n_layers, description="window k")
        self.layers = widgets.IntRangeSlider(value=(0, n_layers - 1), min=0, max=n_layers - 1, description="centres")
        self.flow = widgets.Dropdown(options=list(flows), value=flows[0], description="flow")
        self.task = widgets.Dropdown(options=tasks, value=tasks[0], description="task")
        self.example = widgets.Dropdown(description="example")
        self.output = widgets.Output()
        self.result: pd.DataFrame | None = None
        self._sync_examples()
        self.task.observe(lambda _: self._sync_examples(), names="value")
        for control in (self.window, self.layers, self.flow, self.example):
            control.observe(lambda _: self.update(), names="value")
        self.panel = widgets.VBox(
            [widgets.HBox([self.window, self.layers]), widgets.HBox([self.flow, self.task, self.example]), self.output]
        )

    def _sync_examples(self) -> None:
        options = [
            (f"{e.example_id}: {e.question}", i) for i, e in enumerate(self.examples) if e.task == self.task.value
        ]
        self.example.options = options
        self.example.value = options[0][1]

    def update(self) -> pd.DataFrame:
        """Re-run the knockout for the current setting and redraw; returns the sweep's rows."""
        example = self.examples[self.example.value]
        encoded = self.run.encode(example, patches=True)
        lo, hi = self.layers.value
        sweep = knockout_sweep(
            self.run.model, encoded, [self.flow.value], self.window.value, "fast", layers=range(lo, hi + 1)
        )
        self.result = sweep.assign(example_id=example.example_id, task=example.task)
        self.output.clear_output(wait=True)
        with self.output:
            self.figure(example)
        return self.result

    def figure(self, example: Example) -> Any:
        """The current setting's figure: the example's patch groups and the knockout curve."""
        import matplotlib.pyplot as plt

        fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(9, 3.4))
        plot_patch_overlay(self.run.model, self.run.processor, example, ax_img, self.run.inputs)
        ax_curve.plot(self.result["layer"], self.result["rel_change"], marker="o")
        ax_curve.axhline(0, color="grey", lw=0.6)
        ax_curve.set(xlabel="centre layer", ylabel=YLABEL_CHANGE, title=f"{self.flow.value}, k={self.window.value}")
        fig.tight_layout()
        plt.show()
        return fig

    def show(self) -> None:
        """Display the panel in a live frontend; headless (papermill, nbconvert) show the first setting statically."""
        from IPython.display import display

        if interactive_frontend():
            display(self.panel)
            self.update()
        else:
            self.update()
            self.figure(self.examples[self.example.value])
