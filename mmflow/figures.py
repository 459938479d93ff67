"""Figures: curve tables with confidence bands, PNG + PDF + CSV, computed captions, patch overlays.

Every figure's file stem is a constant here, and :data:`NOTEBOOK_FIGURES` says which notebook writes which, so
notebooks, tests and the Makefile never spell a file name twice.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmflow.cache import folder_lock
from mmflow.data import Example
from mmflow.errors import MmflowError
from mmflow.lens import ANSWER, WITH_NORM
from mmflow.models import LlavaModel
from mmflow.paper import layer_third
from mmflow.patches import RELATED, base_patch_grid
from mmflow.styles import STYLES, layer_axis, line_style

FIG_TO_LAST = "fig1_to_last"
FIG_IMAGE_TO_QUESTION = "fig2_image_to_question"
FIG_PATCH_GROUPS = "fig3_patch_groups"
FIG_PATCH_EXAMPLE = "fig3_patch_groups_example"
FIG_CASING = "fig4_answer_casing"
FIG_CASING_PER_TASK = "fig4_answer_casing_per_task"
FIG_OVERVIEW = "fig5_overview"
#: Which figures each notebook (by file stem) writes; notebook N writes figN_*.
NOTEBOOK_FIGURES = {
    "1_to_last_flow": (FIG_TO_LAST,),
    "2_image_to_question": (FIG_IMAGE_TO_QUESTION,),
    "3_patch_groups": (FIG_PATCH_GROUPS, FIG_PATCH_EXAMPLE),
    "4_answer_casing": (FIG_CASING, FIG_CASING_PER_TASK),
    "5_overview": (FIG_OVERVIEW,),
    "6_across_models": ("fig6_across_models", "fig6_across_models_lens"),
}
YLABEL_CHANGE = "% change in answer probability"
#: What a panel or a summary says when no example was kept.
NO_KEPT = "no kept examples"
#: Changes smaller than this (percentage points) are reported as no change.
NOISE_PP = 1.0


#: The colour of each flow and lens token (from :data:`~mmflow.styles.STYLES`, the one table of looks).
COLORS = {label: style.color for label, style in STYLES.items()}
#: Bootstrap resamples of the 95% band, and its seed (so reruns draw the same band).
N_BOOT, BOOT_SEED = 1000, 0


def bootstrap_band(values: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT) -> tuple[float, float]:
    """95% percentile-bootstrap band of the mean: it stays within the values' range (never below -100%).

    Example:
        >>> bootstrap_band(np.array([-100.0, -100.0, -90.0]), np.random.default_rng(0))[0] >= -100
        True
    """
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def curve_table(
    rows: pd.DataFrame, value: str = "rel_change", by: Sequence[str] = ("task", "flow", "layer")
) -> pd.DataFrame:
    """Mean of ``value`` over examples with a 95% percentile-bootstrap band (seeded), per ``by`` group.

    Returns:
        Columns ``*by, mean, n, ci_low, ci_high``, groups in order of first appearance: exactly what
        :func:`plot_curves` draws and the figure's CSV holds.
    """
    rng = np.random.default_rng(BOOT_SEED)
    out = []
    for key, group in rows.groupby(list(by), sort=False)[value]:
        values = group.to_numpy(dtype=float)
        low, high = bootstrap_band(values, rng)
        out.append({**dict(zip(by, key)), "mean": values.mean(), "n": len(values), "ci_low": low, "ci_high": high})
    return pd.DataFrame(out, columns=[*by, "mean", "n", "ci_low", "ci_high"])


def _short(label: str) -> str:
    """A curve label without its parenthesised form: ``answer (lowercase)`` -> ``answer``."""
    return label.split(" (")[0]


def panel_n(part: pd.DataFrame, line: str) -> str:
    """The examples behind a panel's curves: ``n=40``, or per curve where they differ (``n=240 answer, 120 false
    option``, or with the full labels where the short ones would be ambiguous).

    Example:
        >>> t = pd.DataFrame({"token": ["answer (lowercase)", "false option (lowercase)"], "n": [240, 120]})
        >>> panel_n(t, "token"), panel_n(t.assign(n=40), "token")
        ('n=240 answer, 120 false option', 'n=40')
    """
    counts = part.groupby(line, sort=False)["n"].max()
    if counts.nunique() == 1:
        return f"n={int(counts.iloc[0])}"
    groups: dict[int, list[str]] = {}
    for label, n in counts.items():
        groups.setdefault(int(n), []).append(label)
    short = {n: list(dict.fromkeys(_short(label) for label in labels)) for n, labels in groups.items()}
    names = [name for labels in short.values() for name in labels]
    if len(names) != len(set(names)):
        short = groups
    return "n=" + ", ".join(f"{n} {'/'.join(labels)}" for n, labels in sorted(short.items(), reverse=True))


def plot_curves(
    table: pd.DataFrame,
    panel: str = "task",
    line: str = "flow",
    x: str = "layer",
    ylabel: str = YLABEL_CHANGE,
    title: str = "",
    ncols: int = 3,
    panels: Sequence[str] | None = None,
    xlabel: str | None = None,
) -> Any:
    """One panel per ``panel`` value, one line (mean, with its bootstrap band) per ``line`` value.

    Each flow / token is drawn in its style of :data:`~mmflow.styles.STYLES`; the panels share their y axis; each
    panel's layer axis has integer ticks and spans its own layers; its title says how many examples stand behind
    its curves (per curve where they differ).

    Args:
        panels: the panels to draw, in order (default: those in ``table``); one without data says
            "no kept examples", so a task never silently disappears.
        xlabel: default "centre layer" for knockout curves (``line="flow"``), else "layer".

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(panels if panels is not None else table[panel])) or [NO_KEPT]
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows + 0.6), squeeze=False, sharey=True, layout="constrained"
    )
    labels = list(dict.fromkeys(table[line]))
    styles = {label: line_style(label, i) for i, label in enumerate(labels)}
    for ax, name in zip(axes.flat, panels):
        part = table[table[panel] == name]
        for label, curve in part.groupby(line, sort=False):
            curve = curve.sort_values(x)
            ax.plot(curve[x], curve["mean"], markersize=4, label=label, **styles[label])
            ax.fill_between(curve[x], curve["ci_low"], curve["ci_high"], color=styles[label]["color"], alpha=0.18, lw=0)
        if not len(part):
            ax.text(0.5, 0.5, NO_KEPT, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{name}\n{panel_n(part, line) if len(part) else 'n=0'}", fontsize=10)
        layer_axis(ax, sorted(part[x].unique()), xlabel or ("centre layer" if line == "flow" else "layer"))
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if labels:
        handles = [plt.Line2D([], [], markersize=4, label=label, **styles[label]) for label in labels]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


#: The flows figure 5 puts side by side, from figures 1 and 3.
OVERVIEW_FLOWS = ("Other patches->Question", "Related patches->Question", "Question->Last", "Image->Last")


def overview_curves(flows: pd.DataFrame, lens: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 5's curves: the stages' flows averaged over tasks (``flow, layer, mean``) and the answer's forms
    through the lens with the final norm (``token, layer, mean``)."""
    stages = mean_over_tasks(flows)
    stages = stages[stages.flow.isin(OVERVIEW_FLOWS)]
    casing = lens[(lens.view == WITH_NORM) & lens.token.str.startswith(ANSWER)][["token", "layer", "mean"]]
    return stages, casing


def plot_overview(flows: pd.DataFrame, lens: pd.DataFrame, title: str) -> Any:
    """Figure 5: the knockout stages (mean over tasks) beside the answer's lowercase and Capitalized forms, each
    curve in its style and labelled with the examples behind it.

    Args:
        flows: the per-task curve tables of figures 1 and 3; lens: figure 4's table; title: names model and k.
    """
    import matplotlib.pyplot as plt

    stages, casing = overview_curves(flows, lens)
    n_flow = flows.groupby(["flow", "task"])["n"].max().groupby("flow").sum()
    n_token = lens[lens.view == WITH_NORM].groupby("token")["n"].max()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    panels = (
        (axes[0], stages, "flow", n_flow, "centre layer", "% change in answer probability (mean over tasks)"),
        (axes[1], casing, "token", n_token, "layer", "probability at the last position"),
    )
    for ax, curves, line, counts, xlabel, ylabel in panels:
        for i, (label, curve) in enumerate(curves.groupby(line, sort=False)):
            ax.plot(
                curve["layer"], curve["mean"], markersize=4, label=f"{label}, n={counts[label]}", **line_style(label, i)
            )
        layer_axis(ax, sorted(curves["layer"].unique()), xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0].axhline(0, color="grey", lw=0.6)
    axes[0].set_title("Attention knockout: flows, mean over tasks")
    axes[1].set_title(f"Logit lens: answer forms, {WITH_NORM}")
    fig.suptitle(title)
    return fig


FLOAT_FORMAT = "%.6f"
#: Two runs' figure data agree when every number is within CSV_ATOL + CSV_RTOL * |value|: float32 summation order
#: differs across machines and thread counts (seen: up to 5e-5 percentage points on the default run).
CSV_ATOL, CSV_RTOL = 1e-4, 1e-5
#: The file beside the figures that records what each figure was computed from.
MANIFEST = "manifest.json"


def save_figure(fig: Any, data: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name``.png, .pdf and the figure's data as .csv (fixed precision, so reruns give identical files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    data.to_csv(paths[2], index=False, float_format=FLOAT_FORMAT)
    return paths


def same_data(old: pd.DataFrame, new: pd.DataFrame) -> bool:
    """True if two figure tables have the same columns, rows and text, and numbers within CSV_ATOL/CSV_RTOL.

    Example:
        >>> a = pd.DataFrame({"flow": ["x"], "mean": [-89.42201]})
        >>> same_data(a, a.assign(mean=-89.42204)), same_data(a, a.assign(mean=-89.4))
        (True, False)
    """
    if list(old.columns) != list(new.columns) or old.shape != new.shape:
        return False
    for column in new.columns:
        a, b = old[column], new[column]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            if not np.allclose(a.to_numpy(float), b.to_numpy(float), rtol=CSV_RTOL, atol=CSV_ATOL, equal_nan=True):
                return False
        elif not a.astype(str).equals(b.astype(str)):
            return False
    return True


def as_saved(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every float column as its CSV file gives it back (written with :data:`FLOAT_FORMAT`, read by
    pandas), other columns untouched: what a rerun reads, so a first run plots the very same numbers.

    Example:
        >>> as_saved(pd.DataFrame({"flow": ["x"], "mean": [-89.42200913]}))["mean"].tolist()
        [-89.422009]
    """
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    if not floats:
        return table
    back = pd.read_csv(io.StringIO(table[floats].to_csv(index=False, float_format=FLOAT_FORMAT)))
    out = table.copy()
    for i, column in enumerate(floats):
        out[column] = back.iloc[:, i].to_numpy()
    return out


def stable_table(table: pd.DataFrame, out_dir: str | Path, name: str) -> pd.DataFrame:
    """The figure data already in ``out_dir/name.csv`` if ``table`` agrees with it (see :func:`same_data`), else
    ``table`` with its floats as they will be saved (:func:`as_saved`).

    Plotting and saving what this returns makes a rerun, on this machine or another, or with other thread counts,
    leave the figure files byte-identical (a first run draws the saved numbers too, not their unrounded forms),
    while any real change (beyond the stated tolerance) replaces them.
    """
    table = as_saved(table)
    path = Path(out_dir) / f"{name}.csv"
    if not path.is_file():
        return table
    try:
        on_disk = pd.read_csv(path)
    except (ValueError, OSError):
        return table
    written = pd.read_csv(io.StringIO(table.to_csv(index=False, float_format=FLOAT_FORMAT)))
    return on_disk if same_data(on_disk, written) else table


def record_provenance(out_dir: str | Path, name: str, **provenance: Any) -> None:
    """Note in ``out_dir/manifest.json`` what figure ``name`` was computed from (model, data, examples, window)."""
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir):  # notebooks that run side by side (make reproduce JOBS=2) each add their entry
        manifest = read_manifest(out_dir)
        manifest[name] = provenance
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The provenance of the figures in ``out_dir`` (empty if there is none or it does not parse)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def check_provenance(out_dir: str | Path, names: Sequence[str], model: str, data: str | None = None) -> None:
    """Raise unless every figure in ``names`` was computed for ``model`` (and ``data``, if given).

    Raises:
        MmflowError: naming the figure and the model or data it belongs to.
    """
    manifest = read_manifest(out_dir)
    for name in names:
        entry = manifest.get(name)
        if entry is None:
            raise MmflowError(
                f"{Path(out_dir) / name}.csv has no entry in {MANIFEST}: run the notebook that writes it "
                f"with out_dir={str(out_dir)!r} first"
            )
        if entry.get("model") != model:
            raise MmflowError(
                f"{Path(out_dir) / name}.csv was computed for model {entry.get('model')!r}, not {model!r}: "
                "rerun the analyses for this model, or point out_dir at its figures"
            )
        if data is not None and entry.get("data") != data:
            raise MmflowError(
                f"{Path(out_dir) / name}.csv was computed on data {entry.get('data')!r}, not {data!r}: "
                "rerun the analyses on this data, or point out_dir at its figures"
            )


def largest_drop(table: pd.DataFrame, **where: Any) -> tuple[int, float]:
    """(layer, mean % change) of the most negative point of a curve selected by column values.

    Example:
        >>> curves = pd.DataFrame({"flow": ["a", "a", "b"], "layer": [0, 1, 0], "mean": [-1.0, -5.0, -9.0]})
        >>> largest_drop(curves, flow="a")
        (1, -5.0)
    """
    part = table
    for column, value in where.items():
        part = part[part[column] == value]
    row = part.loc[part["mean"].idxmin()]
    return int(row["layer"]), float(row["mean"])


def mean_over_tasks(table: pd.DataFrame) -> pd.DataFrame:
    """The per-task curves of a :func:`curve_table` averaged over tasks: columns ``flow, layer, mean``."""
    return table.groupby(["flow", "layer"], sort=False)["mean"].mean().reset_index()


def describe_curves(table: pd.DataFrame, flows: Sequence[str], n_layers: int) -> str:
    """One computed sentence per flow: where its mean over tasks drops most, and in which third of the model."""
    overall = mean_over_tasks(table)
    lines = []
    for flow in flows:
        if not (overall.flow == flow).any():
            lines.append(f"- {flow}: {NO_KEPT}")
            continue
        layer, value = largest_drop(overall, flow=flow)
        if value > -NOISE_PP:
            lines.append(f"- {flow}: no drop beyond {NOISE_PP:.0f}% at any centre layer (lowest {value:+.2f}%)")
        else:
            lines.append(
                f"- {flow}: most negative mean change {value:+.1f}% at layer {layer} "
                f"({layer_third(layer, n_layers)} layers)"
            )
    return "\n".join(lines)


def plot_patch_overlay(
    model: LlavaModel, processor, example: Example, ax: Any = None, inputs: str = "processor"
) -> Any:
    """The model's view of an example's image (its base tile, as ``inputs`` builds it) with related (red) and other
    (blue) patches overlaid."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image, grid = base_patch_grid(model, processor, example.image(), example.boxes or [], inputs)
    ax = ax or plt.subplots(figsize=(3.5, 3.5))[1]
    ax.imshow(image)
    cell = image.shape[0] / grid.shape[0]
    for (r, c), label in np.ndenumerate(grid):
        color = "red" if label == RELATED else "tab:blue"
        ax.add_patch(
            Rectangle(
                (c * cell, r * cell),
                cell,
                cell,
                facecolor=color,
                alpha=0.35 if label == RELATED else 0.12,
                edgecolor=color,
                lw=0.5,
            )
        )
    title = textwrap.fill(f"{example.task}: {example.question}", 38)
    ax.set_title(f"{title}\n(answer: {example.answer}; red = related patches)", fontsize=8)
    ax.axis("off")
    return ax
