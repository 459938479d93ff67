"""Computed verdicts against the paper's claims, on hand-made curve tables whose answer is known."""

from __future__ import annotations

import pandas as pd

from mmflow import findings
from mmflow.lens import ANSWER, CAPITALIZED, FALSE_OPTION, LOWERCASE, WITH_NORM, token_label

N_LAYERS = 9  # thirds: 0-2 lower, 3-5 middle, 6-8 upper


def curves(
    flow_values: dict[str, list[float]], tasks=("ChooseAttr", "QueryAttr"), n: int = 40, half_band: float = 1.0
) -> pd.DataFrame:
    """A curve table with the same values for every task: n examples per task, a band of +-half_band around each
    mean (a clear effect by default)."""
    rows = [
        {"task": t, "flow": f, "layer": layer, "mean": v, "n": n, "ci_low": v - half_band, "ci_high": v + half_band}
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


def lens_table(low: list[float], cap: list[float], n: int = 240, half_band: float = 0.01) -> pd.DataFrame:
    rows = [
        {
            "view": WITH_NORM,
            "token": token,
            "layer": layer,
            "mean": v,
            "n": n,
            "ci_low": v - half_band,
            "ci_high": v + half_band,
        }
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


def test_a_clear_effect_gives_its_verdict_with_n_and_band():
    verdict = findings.question_to_last(curves({"Question->Last": [0, -2, -5, -30, -60, -20, -3, 0, 0]}), N_LAYERS)
    assert verdict.verdict == "agrees"
    assert (verdict.n, verdict.layer, verdict.ci_low, verdict.ci_high) == (80, 4, -61.0, -59.0)
    assert "| 80 | [-61, -59] at layer 4 | **agrees** |" in findings.verdict_markdown([verdict])
    table = findings.verdict_table([verdict])
    assert list(table.columns) == ["analysis", "paper", "this_model", "verdict", "n", "layer", "ci_low", "ci_high"]


def test_too_few_examples_are_inconclusive_whatever_the_means():
    """n_per_task = 2 on 6 tasks: 12 examples, below the stated minimum; the verdict says so and gives n."""
    tasks = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
    tiny = curves({"Question->Last": [0, -2, -5, -30, -60, -20, -3, 0, 0]}, tasks, n=2)
    verdict = findings.question_to_last(tiny, N_LAYERS)
    assert verdict.verdict == "inconclusive" and verdict.n == 12 < findings.MIN_EXAMPLES
    assert f"only 12 examples (a verdict needs {findings.MIN_EXAMPLES})" in verdict.this_model
    small_lens = lens_table([0.0, 0.1, 0.4, 0.5, 0.2, 0.01], [0.0, 0.0, 0.1, 0.3, 0.7, 0.98], n=4)
    assert findings.answer_casing(small_lens).verdict == "inconclusive"


def test_a_band_that_spans_drop_and_no_drop_is_inconclusive():
    """Bands from 0 to -100% (what two examples per task give): the means say "partly", the bands cannot tell a drop
    from none."""
    wide = curves({"Question->Last": [-50, -40, -5, 0, 0, 0, 0, 0, 0]}, half_band=50.0)
    verdict = findings.question_to_last(wide, N_LAYERS)
    assert verdict.verdict == "inconclusive" and (verdict.ci_low, verdict.ci_high) == (-100.0, 0.0)
    assert (
        findings.image_to_question(
            curves({"Image->Question": [-50, -20, -5, -30, 0, 0, 0, 0, 0]}, half_band=45.0), N_LAYERS
        ).verdict
        == "inconclusive"
    )
    narrow_no_drop = curves({"Question->Last": [-3, -2, 0, 0, 0, 0, 0, 0, 0]}, half_band=2.0)
    assert findings.question_to_last(narrow_no_drop, N_LAYERS).verdict == "differs"
    no_drop_or_drop = curves({"Question->Last": [-3, -2, 0, 0, 0, 0, 0, 0, 0]}, half_band=9.0)
    assert findings.question_to_last(no_drop_or_drop, N_LAYERS).verdict == "inconclusive"
    near_zero = curves({"Image->Last": [0.5] * N_LAYERS}, half_band=8.0)  # about zero, or a change beyond 5%?
    assert findings.image_to_last(near_zero, N_LAYERS).verdict == "inconclusive"
    casing = lens_table([0.0, 0.05, 0.4, 0.05, 0.01, 0.3], [0.2, 0.3, 0.5, 0.7, 0.9, 0.35], half_band=0.1)
    assert findings.answer_casing(casing).verdict == "inconclusive"  # who wins at the top is within the bands
