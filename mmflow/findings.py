"""The paper's claims next to computed verdicts for the model at hand: one function per claim, no hand-typed numbers.

A verdict is one of ``agrees``, ``mostly agrees``, ``partly``, ``differs``, or ``not computed`` where no example was
kept; the thresholds are constants here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from mmflow.figures import NO_KEPT, mean_over_tasks
from mmflow.lens import ANSWER, CAPITALIZED, LOWERCASE, WITH_NORM, token_label
from mmflow.paper import IMAGE_TO_QUESTION, PATCH_FLOWS, layer_third

#: A mean change at or below -DROP_PP percent counts as a drop.
DROP_PP = 10.0
#: A mean change within +-SMALL_PP percent counts as about zero.
SMALL_PP = 5.0


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper, what this model shows, and how the two compare."""

    analysis: str
    paper: str
    this_model: str
    verdict: str


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """The verdicts as a table (one row each)."""
    return pd.DataFrame([asdict(v) for v in verdicts])


def verdict_markdown(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a Markdown table."""
    lines = ["| analysis | paper | this model | verdict |", "|---|---|---|---|"]
    lines += [f"| {v.analysis} | {v.paper} | {v.this_model} | **{v.verdict}** |" for v in verdicts]
    return "\n".join(lines)


#: The paper's claims, as the verdict tables state them.
CLAIMS = {
    "Image->Last": "about 0 at every layer",
    "Question->Last": "large drop in the middle layers",
    IMAGE_TO_QUESTION: "two drops: lower layers, then lower-middle layers",
    PATCH_FLOWS[1]: "drop in the lower layers (general image information)",
    PATCH_FLOWS[0]: "drop in the lower-middle layers, after the other patches",
    "Answer casing": "lowercase answer forms in the middle layers, Capitalized wins at the top",
}
#: The verdict where there is no data to judge.
NOT_COMPUTED = "not computed"


def _not_computed(analysis: str) -> Verdict:
    return Verdict(analysis, CLAIMS[analysis], NO_KEPT, NOT_COMPUTED)


def _curve(table: pd.DataFrame, flow: str) -> pd.Series:
    overall = mean_over_tasks(table)
    return overall[overall.flow == flow].set_index("layer")["mean"].sort_index()


def _drop_text(flow_curve: pd.Series, n_layers: int) -> tuple[int, float, str]:
    layer, value = int(flow_curve.idxmin()), float(flow_curve.min())
    return layer, value, f"largest drop {value:+.1f}% at layer {layer} ({layer_third(layer, n_layers)} layers)"


def _drop_verdict(value: float, where_claimed: bool) -> str:
    """``differs`` without a drop, ``agrees`` with a drop where the paper puts it, else ``partly``.

    Example:
        >>> _drop_verdict(-3.0, True), _drop_verdict(-40.0, True), _drop_verdict(-40.0, False)
        ('differs', 'agrees', 'partly')
    """
    if value > -DROP_PP:
        return "differs"
    return "agrees" if where_claimed else "partly"


def image_to_last(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Image->Last is about zero at every layer (the image does not reach the last position directly).

    ``agrees`` if the mean over tasks and every task's curve stay within +-SMALL_PP; ``mostly agrees`` if the mean
    over tasks does at half the layers or more (the text names the task that strays most); else ``differs``.
    """
    curve = _curve(table, "Image->Last")
    if curve.empty:
        return _not_computed("Image->Last")
    small = int((curve.abs() <= SMALL_PP).sum())
    _, _, drop = _drop_text(curve, n_layers)
    per_task = table[table.flow == "Image->Last"]
    worst = per_task.iloc[int(per_task["mean"].abs().to_numpy().argmax())]
    tasks_small = abs(worst["mean"]) <= SMALL_PP
    observed = f"mean over tasks within ±{SMALL_PP:.0f}% at {small} of {len(curve)} centre layers; {drop}"
    if not tasks_small:
        observed += f"; {worst['task']} alone {worst['mean']:+.1f}% at layer {int(worst['layer'])}"
    if small == len(curve) and tasks_small:
        verdict = "agrees"
    else:
        verdict = "mostly agrees" if small >= len(curve) / 2 else "differs"
    return Verdict("Image->Last", CLAIMS["Image->Last"], observed, verdict)


def question_to_last(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Question->Last drops most in the middle layers."""
    curve = _curve(table, "Question->Last")
    if curve.empty:
        return _not_computed("Question->Last")
    layer, value, drop = _drop_text(curve, n_layers)
    verdict = _drop_verdict(value, where_claimed=layer_third(layer, n_layers) == "middle")
    return Verdict("Question->Last", CLAIMS["Question->Last"], drop, verdict)


def _local_minima(curve: pd.Series) -> list[int]:
    values = curve.tolist()
    return [
        int(curve.index[i])
        for i, v in enumerate(values)
        if v <= -DROP_PP and (i == 0 or v < values[i - 1]) and (i == len(values) - 1 or v <= values[i + 1])
    ]


def image_to_question(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Image->Question drops twice: in the lower layers, then in the lower-middle layers."""
    curve = _curve(table, IMAGE_TO_QUESTION)
    if curve.empty:
        return _not_computed(IMAGE_TO_QUESTION)
    minima = _local_minima(curve)
    found = ", ".join(f"{curve[m]:+.1f}% at layer {m}" for m in minima) or f"none below -{DROP_PP:.0f}%"
    if len(minima) >= 2 and layer_third(minima[0], n_layers) == "lower":
        verdict = "agrees"
    else:
        verdict = "partly" if minima else "differs"
    return Verdict(IMAGE_TO_QUESTION, CLAIMS[IMAGE_TO_QUESTION], f"drops: {found}", verdict)


def patch_flows(table: pd.DataFrame, n_layers: int) -> list[Verdict]:
    """Other patches matter in the lower layers; related patches in the lower-middle layers, after them."""
    related, other = PATCH_FLOWS
    curve_o, curve_r = _curve(table, other), _curve(table, related)
    verdicts = [_not_computed(other), _not_computed(related)]
    if not curve_o.empty:
        l_o, v_o, text_o = _drop_text(curve_o, n_layers)
        verdict = _drop_verdict(v_o, where_claimed=layer_third(l_o, n_layers) == "lower")
        verdicts[0] = Verdict(other, CLAIMS[other], text_o, verdict)
    if not curve_r.empty:
        l_r, v_r, text_r = _drop_text(curve_r, n_layers)
        after_other = not curve_o.empty and v_o <= -DROP_PP and l_r > l_o
        verdicts[1] = Verdict(related, CLAIMS[related], text_r, _drop_verdict(v_r, where_claimed=after_other))
    return verdicts


def answer_casing(lens_table: pd.DataFrame) -> Verdict:
    """The lowercase answer forms in the middle layers; the Capitalized form wins at the top."""
    normed = lens_table[lens_table.view == WITH_NORM].pivot(index="layer", columns="token", values="mean").sort_index()
    if normed.empty:
        return _not_computed("Answer casing")
    low, cap = normed[token_label(ANSWER, LOWERCASE)], normed[token_label(ANSWER, CAPITALIZED)]
    top, peak = int(normed.index[-1]), int(low.idxmax())
    cap_wins_top = cap[top] > low[top]
    rises_then_falls = peak < top and low[peak] > 2 * low[top]
    low_wins = [int(layer) for layer in normed.index[:-1] if low[layer] > cap[layer]]
    observed = (
        f"lowercase peaks at layer {peak} (p={low[peak]:.3f}), p={low[top]:.3f} at the top; Capitalized "
        f"p={cap[top]:.3f} at the top; lowercase above Capitalized at "
        f"{'layers ' + str(low_wins) if low_wins else 'no layer'}"
    )
    if cap_wins_top and rises_then_falls and low_wins:
        verdict = "agrees"
    else:
        verdict = "partly" if cap_wins_top and rises_then_falls else "differs"
    return Verdict("Answer casing", CLAIMS["Answer casing"], observed, verdict)
