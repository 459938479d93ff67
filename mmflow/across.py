"""Across models (notebook 6): the same declared analyses on several models, compared at the same relative depth.

Each model gets its own :class:`~mmflow.study.Study` (its own window rule, inputs and filter, the same cache and
analysis declarations as notebooks 1-4, so ``make sweep MODEL=...`` precomputes it). A flow's curve for a model is
its per-task curves (figures 1-3) averaged over tasks, with the band ends averaged the same way (what the verdicts
judge), drawn against the relative depth ``layer / (L - 1)``; the logit lens likewise. The verdicts are those of
notebook 5, one row per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mmflow import findings
from mmflow.errors import MmflowError
from mmflow.figures import NO_KEPT, YLABEL_CHANGE, curve_table
from mmflow.lens import ANSWER, CAPITALIZED, LOWERCASE, WITH_NORM, token_label
from mmflow.paper import IMAGE_TO_QUESTION, PATCH_FLOWS, TO_LAST_FLOWS
from mmflow.study import ANALYSES, FIG_CASING, FIG_IMAGE_TO_QUESTION, FIG_PATCH_GROUPS, FIG_TO_LAST, Study

FIG_ACROSS = "fig6_across_models"
FIG_ACROSS_LENS = "fig6_across_models_lens"
#: The flows notebook 6 compares, in the order of the paper's story (image into the question, then to the last).
ACROSS_FLOWS = ("Other patches->Question", "Related patches->Question", IMAGE_TO_QUESTION, *TO_LAST_FLOWS)
#: The lens tokens it compares (the casing claim's two forms of the answer, in the view with the final norm).
ACROSS_TOKENS = (token_label(ANSWER, LOWERCASE), token_label(ANSWER, CAPITALIZED))
#: One colour and marker per model, by its position in ``models``.
MODEL_LOOKS = (("#1f77b4", "o"), ("#d62728", "s"), ("#2ca02c", "^"), ("#9467bd", "D"), ("#8c564b", "v"))
CURVE_COLUMNS = ["model", "curve", "layer", "depth", "mean", "n", "ci_low", "ci_high"]


def check_models(models: Any) -> list[str]:
    """The ``models`` parameter as a list of distinct names.

    Raises:
        MmflowError: unless it is a non-empty list of distinct non-empty strings.

    Example:
        >>> check_models(["shapes-llava", "shapes-qwen"])
        ['shapes-llava', 'shapes-qwen']
    """
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise MmflowError(f"models must be a non-empty list of model names or folders, got {models!r}")
    bad = [m for m in models if not isinstance(m, str) or not m.strip()]
    if bad:
        raise MmflowError(f"models: {bad[0]!r} is not a model name or folder")
    twice = sorted({m for m in models if list(models).count(m) > 1})
    if twice:
        raise MmflowError(f"models names {twice[0]!r} twice")
    return list(models)


def load_studies(models: Sequence[str], **params: Any) -> list[Study]:
    """One quiet :class:`Study` per model (``params``: those of :meth:`Study.from_params` but ``model``), loaded in
    order; a bad parameter or model fails before the next model loads."""
    studies = []
    for model in check_models(models):
        study = Study.from_params(model=model, **params)
        study.quiet = True  # notebook 6 shows one accounting table for all models
        studies.append(study)
    return studies


def analyse_all(studies: Sequence[Study]) -> dict[str, dict[str, pd.DataFrame]]:
    """Every declared analysis (:data:`~mmflow.study.ANALYSES`) of every model: ``rows[model][figure]``, each as
    notebooks 1-4 get it, what a model's cache lacks computed example by example (:meth:`Study.analyse_together`)."""
    return {study.run.name: study.analyse_together(tuple(ANALYSES)) for study in studies}


def accounting(studies: Sequence[Study]) -> pd.DataFrame:
    """What happened to every example, per model, analysis and task (the per-notebook ``_examples`` tables)."""
    parts = [
        table.assign(model=study.run.name, analysis=name)[["model", "analysis", *table.columns]]
        for study in studies
        for name, table in study.accounts.items()
    ]
    return pd.concat(parts, ignore_index=True)


def save_table(table: pd.DataFrame, out_dir: str, name: str) -> None:
    """Write ``out_dir/name.csv`` (the folder made if needed), numbers at the figures' fixed precision."""
    from pathlib import Path

    from mmflow.figures import FLOAT_FORMAT

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out_dir) / f"{name}.csv", index=False, float_format=FLOAT_FORMAT)


def _depth(layers: pd.Series, n_layers: int) -> pd.Series:
    return layers / max(n_layers - 1, 1)


def model_tables(rows: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One model's figure tables as notebooks 1-4 compute them (per task for the flows; the lens per view)."""
    tables = {name: curve_table(rows[name]) for name in (FIG_TO_LAST, FIG_IMAGE_TO_QUESTION, FIG_PATCH_GROUPS)}
    tables[FIG_CASING] = curve_table(rows[FIG_CASING], value="prob", by=("view", "token", "layer"))
    return tables


def depth_curves(studies: Sequence[Study], rows: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Each model's flow curves (mean over tasks of the per-task curves, band ends likewise, n summed over tasks)
    against relative depth: columns :data:`CURVE_COLUMNS` (``curve``: the flow)."""
    out = []
    for study in studies:
        tables = model_tables(rows[study.run.name])
        flows = pd.concat([tables[name] for name in (FIG_TO_LAST, FIG_IMAGE_TO_QUESTION, FIG_PATCH_GROUPS)])
        for flow in ACROSS_FLOWS:
            band = findings.band_over_tasks(flows, flow).reset_index()
            if band.empty:
                continue
            band = band.rename(columns={"low": "ci_low", "high": "ci_high"})
            out.append(band.assign(model=study.run.name, curve=flow, depth=_depth(band.layer, study.n_layers)))
    return pd.concat(out, ignore_index=True)[CURVE_COLUMNS] if out else pd.DataFrame(columns=CURVE_COLUMNS)


def depth_lens(studies: Sequence[Study], rows: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Each model's lens curves of the answer's two forms (view with the final norm, over all kept examples) against
    relative depth: columns :data:`CURVE_COLUMNS` (``curve``: the token)."""
    out = []
    for study in studies:
        table = model_tables(rows[study.run.name])[FIG_CASING]
        part = table[(table.view == WITH_NORM) & table.token.isin(ACROSS_TOKENS)]
        part = part.rename(columns={"token": "curve"}).assign(model=study.run.name)
        out.append(part.assign(depth=_depth(part.layer, study.n_layers)))
    return pd.concat(out, ignore_index=True)[CURVE_COLUMNS] if out else pd.DataFrame(columns=CURVE_COLUMNS)


def window_rule(study: Study) -> str:
    """A model's depth and window, as the figure legend states them.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> window_rule(NS(run=NS(name="m"), n_layers=8, k=3))
        'm: L=8, k=3 (a window is 3 of 8 layers, 0.38 of the depth)'
    """
    return f"{study.run.name}: L={study.n_layers}, k={study.k} (a window is {study.k} of {study.n_layers} layers, " + (
        f"{study.k / study.n_layers:.2f} of the depth)"
    )


def plot_depth(curves: pd.DataFrame, studies: Sequence[Study], panels: Sequence[str], ylabel: str, title: str) -> Any:
    """One panel per flow (or lens token), one curve per model (mean and band) against relative depth."""
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.4 * ncols, 3.2 * nrows + 0.9), squeeze=False, sharey=True, layout="constrained"
    )
    looks = {s.run.name: MODEL_LOOKS[i % len(MODEL_LOOKS)] for i, s in enumerate(studies)}
    for ax, name in zip(axes.flat, panels):
        part = curves[curves.curve == name]
        for model, curve in part.groupby("model", sort=False):
            color, marker = looks[model]
            curve = curve.sort_values("depth")
            ax.plot(curve.depth, curve["mean"], color=color, marker=marker, markersize=4, label=model)
            ax.fill_between(curve.depth, curve.ci_low, curve.ci_high, color=color, alpha=0.15, lw=0)
        if part.empty:
            ax.text(0.5, 0.5, NO_KEPT, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.axhline(0, color="grey", lw=0.6)
        counts = ", ".join(str(int(c.n.min())) for _, c in part.groupby("model", sort=False)) or "0"
        ax.set_title(f"{name}\nn = {counts}", fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("relative depth, layer / (L-1)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], color=looks[s.run.name][0], marker=looks[s.run.name][1], markersize=4, label=window_rule(s))
        for s in studies
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def verdicts(studies: Sequence[Study], rows: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Every claim of the paper judged on every model as notebook 5 judges it: the verdict table of each model, with
    a ``model`` column first."""
    parts = []
    for study in studies:
        tables = model_tables(rows[study.run.name])
        n = study.n_layers
        judged = [
            findings.image_to_last(tables[FIG_TO_LAST], n),
            findings.question_to_last(tables[FIG_TO_LAST], n),
            findings.image_to_question(tables[FIG_IMAGE_TO_QUESTION], n),
            *findings.patch_flows(tables[FIG_PATCH_GROUPS], n),
            findings.answer_casing(tables[FIG_CASING]),
        ]
        table = findings.verdict_table(judged)
        parts.append(table.assign(model=study.run.name)[["model", *table.columns]])
    return pd.concat(parts, ignore_index=True)


def verdict_grid(table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts as one row per model and one column per claim of the paper (cells: the verdict and n)."""
    cells = table.assign(cell=table.verdict + " (n=" + table.n.astype(str) + ")")
    grid = cells.pivot(index="model", columns="analysis", values="cell")
    order = [a for a in findings.CLAIMS if a in grid.columns]
    return grid.loc[list(dict.fromkeys(table.model)), order]


def depth_sentences(curves: pd.DataFrame, lens: pd.DataFrame, studies: Sequence[Study]) -> str:
    """Markdown: per flow, where each model's largest drop lies in relative depth (layer, depth, % change); per
    model, where the lowercase answer peaks and which form wins at the top."""
    lines = []
    for flow in ACROSS_FLOWS:
        part = curves[curves.curve == flow]
        if part.empty:
            lines.append(f"- **{flow}**: {NO_KEPT} in any model.")
            continue
        where, depths = [], []
        for model, curve in part.groupby("model", sort=False):
            row = curve.loc[curve["mean"].idxmin()]
            if row["mean"] > -findings.SMALL_PP:
                lowest = f"{row['mean']:+.1f}%"
                where.append(f"{model}: no drop beyond {findings.SMALL_PP:g}% at any depth (lowest {lowest})")
                continue
            depths.append(row.depth)
            at = f"layer {int(row.layer)}, {row['mean']:+.1f}%"
            where.append(f"{model}: largest drop at depth {row.depth:.2f} ({at})")
        apart = f"; the drops lie {max(depths) - min(depths):.2f} of the depth apart" if len(depths) > 1 else ""
        lines.append(f"- **{flow}**: {'; '.join(where)}{apart}.")
    lower, upper = ACROSS_TOKENS
    for study in studies:
        mine = lens[lens.model == study.run.name]
        if mine.empty:
            lines.append(f"- **{study.run.name}** lens: {NO_KEPT}.")
            continue
        low = mine[mine.curve == lower].set_index("layer")
        cap = mine[mine.curve == upper].set_index("layer")
        peak, top = int(low["mean"].idxmax()), int(low.index.max())
        winner = "Capitalized" if cap.at[top, "mean"] > low.at[top, "mean"] else "lowercase"
        lines.append(
            f"- **{study.run.name}** lens: the lowercase answer peaks at depth {low.at[peak, 'depth']:.2f} "
            f"(layer {peak}, p={low.at[peak, 'mean']:.3f}); at the top the {winner} form wins "
            f"(lowercase p={low.at[top, 'mean']:.3f}, Capitalized p={cap.at[top, 'mean']:.3f})."
        )
    return "\n".join(lines)


def explore(studies: Sequence[Study], rows: dict[str, dict[str, pd.DataFrame]]) -> None:
    """The knockout explorer with a model switch over every flow (a static figure of the first model when run
    headless), reading each model's analysis rows where they hold the setting; then reports, per model, what the
    notebook computed."""
    from mmflow.widgets import ModelSwitchExplorer

    knockouts = (FIG_TO_LAST, FIG_IMAGE_TO_QUESTION, FIG_PATCH_GROUPS)
    by_model = {name: pd.concat([analyses[f] for f in knockouts], ignore_index=True) for name, analyses in rows.items()}
    ModelSwitchExplorer(studies, by_model, list(ACROSS_FLOWS)).show()
    for study in studies:
        study.report_computed()


def provenance(studies: Sequence[Study], data: str) -> dict[str, Any]:
    """What the notebook's figures were computed from, for the manifest: the models and, per model, its depth,
    window, inputs, filter, examples and identity."""
    return {
        "model": [s.run.name for s in studies],
        "data": data,
        "models": {
            s.run.name: {
                "n_layers": s.n_layers,
                "k": s.k,
                "inputs": s.run.inputs,
                "keep": s.keep,
                "examples": len(s.examples),
                "model_identity": s.run.identity.sha256 if s.run.identity else None,
            }
            for s in studies
        },
        "tasks": studies[0].tasks,
    }


__all__ = [
    "ACROSS_FLOWS",
    "ACROSS_TOKENS",
    "FIG_ACROSS",
    "FIG_ACROSS_LENS",
    "PATCH_FLOWS",
    "YLABEL_CHANGE",
    "accounting",
    "analyse_all",
    "check_models",
    "depth_curves",
    "depth_lens",
    "depth_sentences",
    "explore",
    "load_studies",
    "plot_depth",
    "provenance",
    "save_table",
    "verdict_grid",
    "verdicts",
    "window_rule",
]
