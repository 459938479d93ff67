"""Every figure, rendered from synthetic tables, read back from the matplotlib objects (not pixels): one style per
flow and lens token, integer layer ticks, no empty slot, n per curve where curves differ, titles that say what."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

import mmflow_utils as mu
from mmflow.styles import style_of, tick_values

matplotlib.use("Agg")
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TASKS = ["ChooseAttr", "QueryAttr"]
TOKENS = [
    mu.token_label(role, form) for role in (mu.ANSWER, mu.FALSE_OPTION) for form in (mu.LOWERCASE, mu.CAPITALIZED)
]


def knockout_table(flows, layers=range(3, 6), n=40) -> pd.DataFrame:
    """A per-task curve table (figures 1-3), -10% at every point, a band of +-2."""
    rows = [
        {"task": t, "flow": f, "layer": layer, "mean": -10.0, "n": n, "ci_low": -12.0, "ci_high": -8.0}
        for t in TASKS
        for f in flows
        for layer in layers
    ]
    return pd.DataFrame(rows)


def lens_table() -> pd.DataFrame:
    """Figure 4's table: the paper's view starts at -1 (embeddings), the others at 0; false options: half the n."""
    rows = []
    for view, first in ((mu.WITH_NORM, 0), (mu.RAW, 0), (mu.PAPER_VIEW, -1)):
        for token in TOKENS:
            n = 120 if token.startswith(mu.FALSE_OPTION) else 240
            for layer in range(first, 8):
                rows.append(
                    {"view": view, "token": token, "layer": layer, "mean": 0.2, "n": n, "ci_low": 0.1, "ci_high": 0.3}
                )
    return pd.DataFrame(rows)


def styled_lines(fig):
    """(label, Line2D) of every drawn curve and legend handle whose label names a flow or token."""
    found = []
    for ax in fig.axes:
        found += [(line.get_label(), line) for line in ax.get_lines()]
        if ax.get_legend():
            found += [(h.get_label(), h) for h in ax.get_legend().legend_handles]
    for legend in fig.legends:
        found += [(h.get_label(), h) for h in legend.legend_handles]
    return [(label.split(", n=")[0], line) for label, line in found if label.split(", n=")[0] in mu.STYLES]


def assert_styles(fig) -> set[str]:
    """Every styled curve of ``fig`` is drawn in its entry of the one style table; returns the labels seen."""
    seen = set()
    for label, line in styled_lines(fig):
        style = style_of(label)
        assert matplotlib.colors.to_hex(line.get_color()) == style.color, label
        assert line.get_marker() == style.marker, label
        assert (line.get_linestyle() == "-") == (not style.dashes), label
        seen.add(label)
    return seen


def assert_integer_layer_ticks(fig) -> None:
    for ax in fig.axes:
        if "layer" in ax.get_xlabel():
            ticks = tick_values(ax)
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def figures() -> dict[str, object]:
    """Every figure of the notebooks, drawn the way the notebooks draw it, from synthetic tables."""
    to_last = knockout_table(mu.TO_LAST_FLOWS)
    patches = knockout_table(mu.PATCH_FLOWS, n=39)
    lens = lens_table()
    per_task = pd.concat([lens[lens.view == mu.WITH_NORM].drop(columns="view").assign(task=t) for t in TASKS])
    return {
        mu.FIG_TO_LAST: mu.plot_curves(to_last, title="m: flows to the last position, k=3", panels=TASKS),
        mu.FIG_IMAGE_TO_QUESTION: mu.plot_curves(knockout_table([mu.IMAGE_TO_QUESTION]), title="m: I, k=3"),
        mu.FIG_PATCH_GROUPS: mu.plot_curves(patches, title="m: patches, k=3", panels=TASKS),
        mu.FIG_CASING: mu.plot_curves(lens, panel="view", line="token", ylabel="probability", title="m: lens"),
        mu.FIG_CASING_PER_TASK: mu.plot_curves(per_task, panel="task", line="token", ylabel="p", title="m: lens"),
        mu.FIG_OVERVIEW: mu.plot_overview(pd.concat([to_last, patches]), lens, "m: three stages, k=3"),
    }


@pytest.fixture(scope="module")
def drawn():
    import matplotlib.pyplot as plt

    yield figures()
    plt.close("all")


def test_one_style_per_flow_and_token_in_every_figure(drawn):
    seen = {name: assert_styles(fig) for name, fig in drawn.items()}
    assert (
        set(mu.TO_LAST_FLOWS) <= seen[mu.FIG_TO_LAST]
        and set(mu.TO_LAST_FLOWS) - {"Last->Last"} <= seen[mu.FIG_OVERVIEW]
    )
    assert set(TOKENS) <= seen[mu.FIG_CASING] and set(mu.PATCH_FLOWS) <= seen[mu.FIG_PATCH_GROUPS]
    dashed = [line for label, line in styled_lines(drawn[mu.FIG_OVERVIEW]) if label == "Image->Last"]
    assert dashed and all(line.get_linestyle() != "-" for line in dashed)  # as in figure 1, not solid
    assert len({(s.color, s.dashes, s.marker) for s in [style_of(f) for f in mu.FLOWS]}) == len(mu.FLOWS)


def test_layer_axes_have_integer_ticks_and_no_empty_slot(drawn):
    for fig in drawn.values():
        assert_integer_layer_ticks(fig)
    for ax in drawn[mu.FIG_CASING].axes[:3]:
        lines = [line for line in ax.get_lines() if line.get_label() in TOKENS]
        first = min(min(line.get_xdata()) for line in lines)
        assert first - 1 < ax.get_xlim()[0] < first  # the final-norm and raw panels do not reserve x = -1
    assert {min(ax.get_xlim()) < -1 for ax in drawn[mu.FIG_CASING].axes[:3]} == {False, True}


def test_panel_titles_give_n_per_curve_where_it_differs_and_no_doubled_brackets(drawn):
    titles = [ax.get_title() for ax in drawn[mu.FIG_CASING].axes[:3]]
    assert titles[1] == f"{mu.RAW}\nn=240 answer, 120 false option"
    assert [ax.get_title() for ax in drawn[mu.FIG_TO_LAST].axes[:2]] == ["ChooseAttr\nn=40", "QueryAttr\nn=40"]
    assert all(") (" not in t for fig in drawn.values() for t in [ax.get_title() for ax in fig.axes])
    legend = [t.get_text() for t in drawn[mu.FIG_OVERVIEW].axes[0].get_legend().get_texts()]
    assert "Question->Last, n=80" in legend and "Related patches->Question, n=78" in legend


def test_every_figure_has_a_title_naming_the_model(drawn):
    assert all(fig._suptitle is not None and fig._suptitle.get_text().startswith("m: ") for fig in drawn.values())


def test_notebooks_title_every_figure_with_the_model_and_the_window_or_view():
    """Each figure a notebook draws gets a title from ``study.title`` (model, what: flows or lens view, k where the
    figure has a window) or, in the overview, one naming the model and k."""
    calls = []
    for path in sorted(NOTEBOOKS.glob("[0-9]*_*.ipynb")):
        code = "\n".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
        )
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("plot_curves", "plot_overview"):
                calls.append((path.stem, node))
    assert len(calls) == 6
    for stem, call in calls:
        title = ([k.value for k in call.keywords if k.arg == "title"] or call.args[2:3])[0]
        text = ast.unparse(title)
        assert "study.title(" in text or ("{model}" in text and "k=" in text), (stem, text)
        if "lens" in text:
            assert "window=False" in text and ("three views" in text or "WITH_NORM" in text), (stem, text)
