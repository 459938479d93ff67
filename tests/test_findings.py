"""Computed verdicts against the paper's claims, on hand-made curve tables whose answer is known."""

from __future__ import annotations

import pandas as pd

from mmflow import findings
from mmflow.lens import ANSWER, CAPITALIZED, FALSE_OPTION, LOWERCASE, WITH_NORM, token_label

N_LAYERS = 9  # thirds: 0-2 lower, 3-5 middle, 6-8 upper


def curves(flow_values: dict[str, list[float]], tasks=("ChooseAttr", "QueryAttr")) -> pd.DataFrame:
    """A curve table with the same values for every task."""
    rows = [
        {"task": t, "flow": f, "layer": layer, "mean": v, "n": 3}
        for t in tasks
        for f, values in flow_values.items()
        for layer, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_question_to_last_where_the_drop_is():
    middle = [0, -2, -5, -30, -60, -20, -3, 0, 0]
    lower = [-80, -40, -5, -3, -2, -1, 0, 0, 0]
    flat = [-1, -2, 0, 0, 0, 0, 0, 0, 0]
    verdicts = [
        findings.question_to_last(curves({"Question->Last": v}), N_LAYERS).verdict for v in (middle, lower, flat)
    ]
    assert verdicts == ["agrees", "partly", "differs"]


def test_image_to_last_names_a_straying_task():
    flat = curves({"Image->Last": [0.5] * N_LAYERS})
    assert findings.image_to_last(flat, N_LAYERS).verdict == "agrees"
    one_task = pd.concat([flat[flat.task == "ChooseAttr"], curves({"Image->Last": [-30] + [0] * 8}, ["ChooseCat"])])
    verdict = findings.image_to_last(one_task, N_LAYERS)
    assert verdict.verdict == "mostly agrees" and "ChooseCat alone -30.0% at layer 0" in verdict.this_model
    assert findings.image_to_last(curves({"Image->Last": [-20] * N_LAYERS}), N_LAYERS).verdict == "differs"


def test_image_to_question_counts_separate_drops():
    two = [-50, -60, -20, -5, -25, -10, 0, 0, 0]
    one = [-50, -20, -5, 0, 0, 0, 0, 0, 0]
    verdicts = [findings.image_to_question(curves({"Image->Question": v}), N_LAYERS) for v in (two, one)]
    assert [v.verdict for v in verdicts] == ["agrees", "partly"]
    assert verdicts[0].this_model == "drops: -60.0% at layer 1, -25.0% at layer 4"
    assert findings.image_to_question(curves({"Image->Question": [0] * N_LAYERS}), N_LAYERS).verdict == "differs"


def test_patch_flows_need_the_related_drop_after_the_other():
    paper = curves(
        {
            "Related patches->Question": [0, 0, -5, -30, -10, 0, 0, 0, 0],
            "Other patches->Question": [-40, -20, 0, 0, 0, 0, 0, 0, 0],
        }
    )
    assert [v.verdict for v in findings.patch_flows(paper, N_LAYERS)] == ["agrees", "agrees"]
    early = curves(
        {
            "Related patches->Question": [-40, 0, 0, 0, 0, 0, 0, 0, 0],
            "Other patches->Question": [-2, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    )
    assert [v.verdict for v in findings.patch_flows(early, N_LAYERS)] == ["differs", "partly"]


def lens_table(low: list[float], cap: list[float]) -> pd.DataFrame:
    rows = [
        {"view": WITH_NORM, "token": token, "layer": layer, "mean": v}
        for token, values in (
            (token_label(ANSWER, LOWERCASE), low),
            (token_label(ANSWER, CAPITALIZED), cap),
            (token_label(FALSE_OPTION, LOWERCASE), [0.0] * len(low)),
        )
        for layer, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_answer_casing():
    paper = lens_table([0.0, 0.1, 0.4, 0.5, 0.2, 0.01], [0.0, 0.0, 0.1, 0.3, 0.7, 0.98])
    never = lens_table([0.0, 0.05, 0.07, 0.05, 0.01, 0.001], [0.2, 0.3, 0.5, 0.7, 0.9, 0.99])
    lower_wins_top = lens_table([0.0, 0.1, 0.2, 0.4, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0, 0.1, 0.05])
    verdicts = [findings.answer_casing(t) for t in (paper, never, lower_wins_top)]
    assert [v.verdict for v in verdicts] == ["agrees", "partly", "differs"]
    assert "lowercase above Capitalized at layers [1, 2, 3]" in verdicts[0].this_model
