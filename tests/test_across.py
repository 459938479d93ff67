"""Notebook 6's computations (mmflow.across) on hand-made analysis rows: relative depth, the mean over tasks, the
verdicts per model and the sentences."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import pytest

import mmflow_utils as mu
from mmflow import across


def fake_rows(n_layers: int, drop_at: int, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Knockout rows of two tasks x 3 examples with a -60% drop of every flow at ``drop_at`` (else ~0), and lens
    rows where the lowercase answer peaks mid-way and the Capitalized one wins at the top."""
    knockout = []
    for figure, flows in ((mu.FIG_TO_LAST, mu.TO_LAST_FLOWS), (mu.FIG_IMAGE_TO_QUESTION, [mu.IMAGE_TO_QUESTION])):
        for flow in flows:
            for task in ("ChooseAttr", "QueryAttr"):
                for example in range(3):
                    for layer in range(n_layers):
                        change = -60.0 if layer == drop_at else rng.normal(0, 0.1)
                        knockout.append((figure, task, f"{task}-{example}", flow, layer, change))
    frame = pd.DataFrame(knockout, columns=["figure", "task", "example_id", "flow", "layer", "rel_change"])
    rows = {f: part.drop(columns="figure") for f, part in frame.groupby("figure")}
    rows[mu.FIG_PATCH_GROUPS] = frame.iloc[:0].drop(columns="figure")  # no kept example with boxes
    lower, upper = across.ACROSS_TOKENS
    lens = []
    for layer in range(n_layers):
        top = layer == n_layers - 1
        for token, prob in ((lower, 0.05 if top else 0.4 * (layer == n_layers // 2)), (upper, 0.9 if top else 0.0)):
            lens += [("ChooseAttr", "x", mu.WITH_NORM, token, layer, prob)] * 2
    rows[mu.FIG_CASING] = pd.DataFrame(lens, columns=["task", "example_id", "view", "token", "layer", "prob"])
    return rows


@pytest.fixture
def two_models():
    rng = np.random.default_rng(0)
    studies = [NS(run=NS(name="a"), n_layers=8, k=3), NS(run=NS(name="b"), n_layers=12, k=3)]
    return studies, {"a": fake_rows(8, 2, rng), "b": fake_rows(12, 3, rng)}


def test_curves_are_per_model_against_relative_depth(two_models):
    studies, rows = two_models
    curves = across.depth_curves(studies, rows)
    assert list(curves.columns) == across.CURVE_COLUMNS
    b = curves[(curves.model == "b") & (curves.curve == "Question->Last")].set_index("layer")
    assert np.allclose(b.depth, b.index / 11) and list(b.n) == [6] * 12  # n summed over the two tasks
    assert b["mean"].idxmin() == 3 and b.at[3, "mean"] == pytest.approx(-60.0)
    assert set(curves.curve) == {*mu.TO_LAST_FLOWS, mu.IMAGE_TO_QUESTION}  # patch flows: no kept example
    lens = across.depth_lens(studies, rows)
    assert set(lens.model) == {"a", "b"} and set(lens.curve) == set(across.ACROSS_TOKENS)
    text = across.depth_sentences(curves, lens, studies)
    assert "a: largest drop at depth 0.29 (layer 2, -60.0%); b: largest drop at depth 0.27 (layer 3" in text
    assert "the drops lie 0.01 of the depth apart" in text and "Related patches->Question**: no kept" in text
    assert "**b** lens: the lowercase answer peaks at depth 0.55 (layer 6" in text and "Capitalized form wins" in text


def test_verdicts_are_the_overviews_per_model(two_models):
    studies, rows = two_models
    table = across.verdicts(studies, rows)
    assert list(table.columns[:2]) == ["model", "analysis"] and len(table) == 12
    tables = across.model_tables(rows["b"])
    mine = mu.findings.question_to_last(tables[mu.FIG_TO_LAST], 12)
    got = table[(table.model == "b") & (table.analysis == "Question->Last")].iloc[0]
    assert got.verdict == mine.verdict and got.this_model == mine.this_model  # 6 examples: inconclusive
    grid = across.verdict_grid(table)
    assert list(grid.index) == ["a", "b"] and grid.loc["a", "Question->Last"] == f"{mine.verdict} (n=6)"


@pytest.mark.parametrize(
    "models,message",
    [("shapes-llava", "non-empty list"), ([], "non-empty list"), (["a", " "], "not a model"), (["a", "a"], "twice")],
)
def test_models_parameter_is_checked(models, message):
    with pytest.raises(mu.MmflowError, match=message):
        across.check_models(models)
