"""The paper's claims next to computed verdicts for the model at hand: one function per claim, no hand-typed numbers.

A verdict is one of ``agrees``, ``mostly agrees``, ``partly``, ``differs``, ``inconclusive`` or ``not computed``
(no example was kept); the thresholds are constants here.

Every verdict carries its uncertainty: it is judged on the same 95% bootstrap bands the figures draw (the band of the
mean over tasks is taken as the mean of the tasks' bands, which is wider, so more cautious, than a pooled band). It is
``inconclusive`` where the band's two ends lead to opposite readings (one edge supports the paper's claim, the other
gives ``differs``), or where fewer than :data:`MIN_EXAMPLES` examples stand behind the curve. Each verdict states n,
the deciding layer and the band there (columns ``n, layer, ci_low, ci_high`` of ``verdicts.csv``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from mmflow.figures import NO_KEPT
from mmflow.lens import ANSWER, CAPITALIZED, LOWERCASE, WITH_NORM, token_label
from mmflow.paper import IMAGE_TO_QUESTION, PATCH_FLOWS, layer_third

#: A mean change at or below -DROP_PP percent counts as a drop.
DROP_PP = 10.0
#: A mean change within +-SMALL_PP percent counts as about zero.
SMALL_PP = 5.0
#: The fewest examples (summed over tasks) behind a curve for a verdict other than ``inconclusive``.
MIN_EXAMPLES = 20
#: The verdict where the band (or n) cannot tell the paper's reading from its opposite.
INCONCLUSIVE = "inconclusive"
#: The verdict where there is no data to judge.
NOT_COMPUTED = "not computed"
#: Decimals of the band in the verdicts (percentage points or probabilities).
BAND_DIGITS = 3


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper, what this model shows, how the two compare, and the evidence: the number of examples
    behind the curve and the 95% band at the deciding layer."""

    analysis: str
    paper: str
    this_model: str
    verdict: str
    n: int = 0
    layer: int | None = None
    ci_low: float = math.nan
    ci_high: float = math.nan


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """The verdicts as a table (one row each): ``analysis, paper, this_model, verdict, n, layer, ci_low, ci_high``."""
    table = pd.DataFrame([asdict(v) for v in verdicts])
    table["layer"] = table["layer"].astype("Int64")
    return table


def _band_text(v: Verdict) -> str:
    if math.isnan(v.ci_low):
        return ""
    return f"[{v.ci_low:g}, {v.ci_high:g}] at layer {v.layer}"


def verdict_markdown(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a Markdown table, with n and the 95% band at the deciding layer."""
    lines = ["| analysis | paper | this model | n | 95% band | verdict |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {v.analysis} | {v.paper} | {v.this_model} | {v.n} | {_band_text(v)} | **{v.verdict}** |" for v in verdicts
    ]
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


def _not_computed(analysis: str) -> Verdict:
    return Verdict(analysis, CLAIMS[analysis], NO_KEPT, NOT_COMPUTED)


def band_over_tasks(table: pd.DataFrame, flow: str) -> pd.DataFrame:
    """A flow's curve averaged over tasks, with its band: index ``layer``; columns ``mean, low, high`` (the means of
    the tasks' means and 95% band ends, as the figures draw them) and ``n`` (examples, summed over tasks).

    Example:
        >>> t = pd.DataFrame({"task": ["A", "B"], "flow": "F", "layer": 0, "mean": [-10.0, -20.0], "n": [3, 5],
        ...                   "ci_low": [-12.0, -30.0], "ci_high": [-8.0, -10.0]})
        >>> band_over_tasks(t, "F").to_dict("records")
        [{'mean': -15.0, 'low': -21.0, 'high': -9.0, 'n': 8}]
    """
    part = table[table.flow == flow]
    groups = part.groupby("layer")
    band = groups[["mean", "ci_low", "ci_high"]].mean().rename(columns={"ci_low": "low", "ci_high": "high"})
    band["n"] = groups["n"].sum().astype(int)
    return band.sort_index()


def _verdict(analysis: str, observed: str, verdict: str, band: pd.DataFrame, layer: int) -> Verdict:
    """A verdict with its evidence (n and the band at ``layer``); ``inconclusive`` below :data:`MIN_EXAMPLES`."""
    n = int(band["n"].min())
    low, high = round(float(band.at[layer, "low"]), BAND_DIGITS), round(float(band.at[layer, "high"]), BAND_DIGITS)
    if n < MIN_EXAMPLES:
        verdict = INCONCLUSIVE
        observed += f"; only {n} examples (a verdict needs {MIN_EXAMPLES})"
    return Verdict(analysis, CLAIMS[analysis], observed, verdict, n, int(layer), low, high)


def _edges(judge: Callable[[pd.Series], str], band: pd.DataFrame) -> str:
    """``judge`` on the mean curve, or ``inconclusive`` if its verdicts on the band's two ends are on opposite sides
    of the claim (one ``differs``, the other not).

    Example:
        >>> band = pd.DataFrame({"mean": [-12.0], "low": [-20.0], "high": [-4.0]})
        >>> _edges(lambda c: "differs" if c.min() > -DROP_PP else "agrees", band)
        'inconclusive'
    """
    ends = {judge(band["low"]) == "differs", judge(band["high"]) == "differs"}
    return INCONCLUSIVE if len(ends) == 2 else judge(band["mean"])


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


def _drop_claim(band: pd.DataFrame, where: Callable[[int], bool]) -> tuple[int, float, str]:
    """(layer, value, verdict) of a drop claim: a drop is told from no drop by the band at the largest drop (all
    below -DROP_PP: a drop) and at every layer (all above: none); otherwise ``inconclusive``."""
    layer, value = int(band["mean"].idxmin()), float(band["mean"].min())
    if band.at[layer, "high"] <= -DROP_PP or band["low"].min() > -DROP_PP:
        return layer, value, _drop_verdict(value, where(layer))
    return layer, value, INCONCLUSIVE


def _about_zero(low: pd.Series, high: pd.Series, surely: bool) -> pd.Series:
    """Per row: the band lies within +-SMALL_PP (``surely``), or at least reaches into it."""
    if surely:
        return (low >= -SMALL_PP) & (high <= SMALL_PP)
    return (low <= SMALL_PP) & (high >= -SMALL_PP)


def _image_to_last_verdict(small: int, n_points: int, tasks_small: bool) -> str:
    if small == n_points and tasks_small:
        return "agrees"
    return "mostly agrees" if small >= n_points / 2 else "differs"


def image_to_last(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Image->Last is about zero at every layer (the image does not reach the last position directly).

    ``agrees`` if the mean over tasks and every task's curve stay within +-SMALL_PP; ``mostly agrees`` if the mean
    over tasks does at half the layers or more (the text names the task that strays most); else ``differs``. Judged
    on the band's edges too: ``inconclusive`` if the bands allow both ``differs`` and one of the others.
    """
    band = band_over_tasks(table, "Image->Last")
    if band.empty:
        return _not_computed("Image->Last")
    curve = band["mean"]
    small = int((curve.abs() <= SMALL_PP).sum())
    layer = int(curve.abs().idxmax())
    farthest = f"largest change {curve[layer]:+.1f}% at layer {layer} ({layer_third(layer, n_layers)} layers)"
    per_task = table[table.flow == "Image->Last"]
    worst = per_task.iloc[int(per_task["mean"].abs().to_numpy().argmax())]
    tasks_small = abs(worst["mean"]) <= SMALL_PP
    observed = f"mean over tasks within ±{SMALL_PP:.0f}% at {small} of {len(curve)} centre layers; {farthest}"
    if not tasks_small:
        observed += f"; {worst['task']} alone {worst['mean']:+.1f}% at layer {int(worst['layer'])}"
    edges = {
        _image_to_last_verdict(
            int(_about_zero(band["low"], band["high"], surely).sum()),
            len(curve),
            bool(_about_zero(per_task["ci_low"], per_task["ci_high"], surely).all()),
        )
        == "differs"
        for surely in (True, False)
    }
    verdict = INCONCLUSIVE if len(edges) == 2 else _image_to_last_verdict(small, len(curve), tasks_small)
    return _verdict("Image->Last", observed, verdict, band, layer)


def question_to_last(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Question->Last drops most in the middle layers."""
    band = band_over_tasks(table, "Question->Last")
    if band.empty:
        return _not_computed("Question->Last")
    layer, _, verdict = _drop_claim(band, lambda at: layer_third(at, n_layers) == "middle")
    return _verdict("Question->Last", _drop_text(band["mean"], n_layers)[2], verdict, band, layer)


def _local_minima(curve: pd.Series) -> list[int]:
    values = curve.tolist()
    return [
        int(curve.index[i])
        for i, v in enumerate(values)
        if v <= -DROP_PP and (i == 0 or v < values[i - 1]) and (i == len(values) - 1 or v <= values[i + 1])
    ]


def image_to_question(table: pd.DataFrame, n_layers: int) -> Verdict:
    """Image->Question drops twice: in the lower layers, then in the lower-middle layers."""
    band = band_over_tasks(table, IMAGE_TO_QUESTION)
    if band.empty:
        return _not_computed(IMAGE_TO_QUESTION)

    def judge(curve: pd.Series) -> str:
        minima = _local_minima(curve)
        if len(minima) >= 2 and layer_third(minima[0], n_layers) == "lower":
            return "agrees"
        return "partly" if minima else "differs"

    curve = band["mean"]
    minima = _local_minima(curve)
    found = ", ".join(f"{curve[m]:+.1f}% at layer {m}" for m in minima) or f"none below -{DROP_PP:.0f}%"
    return _verdict(IMAGE_TO_QUESTION, f"drops: {found}", _edges(judge, band), band, int(curve.idxmin()))


def patch_flows(table: pd.DataFrame, n_layers: int) -> list[Verdict]:
    """Other patches matter in the lower layers; related patches in the lower-middle layers, after them."""
    related, other = PATCH_FLOWS
    band_o, band_r = band_over_tasks(table, other), band_over_tasks(table, related)
    verdicts = [_not_computed(other), _not_computed(related)]
    if not band_o.empty:
        l_o, v_o, verdict = _drop_claim(band_o, lambda at: layer_third(at, n_layers) == "lower")
        verdicts[0] = _verdict(other, _drop_text(band_o["mean"], n_layers)[2], verdict, band_o, l_o)
    if not band_r.empty:
        after_other = not band_o.empty and v_o <= -DROP_PP
        l_r, _, verdict = _drop_claim(band_r, lambda at: after_other and at > l_o)
        verdicts[1] = _verdict(related, _drop_text(band_r["mean"], n_layers)[2], verdict, band_r, l_r)
    return verdicts


def _casing_verdict(low: pd.Series, cap: pd.Series) -> str:
    """``agrees``: Capitalized wins at the top, lowercase rises then falls and wins somewhere below the top;
    ``partly`` without the last; else ``differs``."""
    top, peak = int(low.index[-1]), int(low.idxmax())
    cap_wins_top = cap[top] > low[top]
    rises_then_falls = peak < top and low[peak] > 2 * low[top]
    low_wins = [int(layer) for layer in low.index[:-1] if low[layer] > cap[layer]]
    if cap_wins_top and rises_then_falls and low_wins:
        return "agrees"
    return "partly" if cap_wins_top and rises_then_falls else "differs"


def answer_casing(lens_table: pd.DataFrame) -> Verdict:
    """The lowercase answer forms in the middle layers; the Capitalized form wins at the top.

    Judged on the means and on the bands' edges most and least favourable to the claim (lowercase high below the
    top and low at the top, Capitalized the other way round): ``inconclusive`` if only one of the two ``differs``.
    """
    normed = lens_table[lens_table.view == WITH_NORM]
    if normed.empty:
        return _not_computed("Answer casing")
    wide = {
        c: normed.pivot(index="layer", columns="token", values=c).sort_index() for c in ("mean", "ci_low", "ci_high")
    }
    lower, upper = token_label(ANSWER, LOWERCASE), token_label(ANSWER, CAPITALIZED)
    low, cap = wide["mean"][lower], wide["mean"][upper]
    top, peak = int(low.index[-1]), int(low.idxmax())
    low_wins = [int(layer) for layer in low.index[:-1] if low[layer] > cap[layer]]
    observed = (
        f"lowercase peaks at layer {peak} (p={low[peak]:.3f}), p={low[top]:.3f} at the top; Capitalized "
        f"p={cap[top]:.3f} at the top; lowercase above Capitalized at "
        f"{'layers ' + str(low_wins) if low_wins else 'no layer'}"
    )

    def edge(favourable: bool) -> str:
        hi, lo = ("ci_high", "ci_low") if favourable else ("ci_low", "ci_high")
        low_edge, cap_edge = wide[hi][lower].copy(), wide[lo][upper].copy()
        low_edge[top], cap_edge[top] = wide[lo][lower][top], wide[hi][upper][top]
        return _casing_verdict(low_edge, cap_edge)

    ends = {edge(True) == "differs", edge(False) == "differs"}
    verdict = INCONCLUSIVE if len(ends) == 2 else _casing_verdict(low, cap)
    counts = normed[normed.token.isin([lower, upper])].groupby("layer")["n"].min()
    band = pd.DataFrame({"low": wide["ci_low"][lower], "high": wide["ci_high"][lower], "n": counts})
    return _verdict("Answer casing", observed, verdict, band, peak)
