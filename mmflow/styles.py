"""One look per flow and per lens token, in every figure (analyses, overview, explorers): colour, dash, marker.

The table :data:`STYLES` is the only place a curve's look is chosen; :func:`line_style` reads it (a label it does not
list gets a fixed look by its position, so custom flows still differ from one another), and :func:`layer_axis` gives
every layer axis integer ticks and no empty slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class Style(NamedTuple):
    """How one curve is drawn: a colour, a dash pattern (empty: solid) and a marker."""

    color: str
    dashes: tuple[float, ...]
    marker: str


SOLID: tuple[float, ...] = ()
DASH: tuple[float, ...] = (4.0, 2.0)
#: Every flow and every lens token, one look each. Image->Last is dashed: it lies on Last->Last when both are ~0.
STYLES = {
    "Question->Last": Style("#1f77b4", SOLID, "o"),
    "Image->Last": Style("#ff7f0e", DASH, "s"),
    "Last->Last": Style("#2ca02c", SOLID, "^"),
    "Image->Question": Style("#9467bd", SOLID, "D"),
    "Related patches->Question": Style("#d62728", SOLID, "o"),
    "Other patches->Question": Style("#7f7f7f", DASH, "s"),
    "answer (lowercase)": Style("#1f77b4", SOLID, "o"),
    "answer (Capitalized)": Style("#ff7f0e", SOLID, "s"),
    "false option (lowercase)": Style("#2ca02c", DASH, "v"),
    "false option (Capitalized)": Style("#d62728", DASH, "^"),
}
#: Looks for labels :data:`STYLES` does not list (custom flows), by their position among a figure's curves.
FALLBACK = tuple(Style(c, SOLID, "o") for c in ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939"))


def style_of(label: str, position: int = 0) -> Style:
    """The look of ``label``: its entry in :data:`STYLES`, else the ``position``-th fallback.

    Example:
        >>> style_of("Image->Last").dashes, style_of("[0, 1]->[5]", 1).color
        ((4.0, 2.0), '#e377c2')
    """
    return STYLES.get(label, FALLBACK[position % len(FALLBACK)])


def line_style(label: str, position: int = 0) -> dict[str, Any]:
    """Keyword arguments of ``Axes.plot`` (and ``Line2D``) that draw ``label`` in its style."""
    style = style_of(label, position)
    dashes = {"dashes": style.dashes} if style.dashes else {}
    return {"color": style.color, "linestyle": "--" if style.dashes else "-", **dashes, "marker": style.marker}


def layer_axis(ax: Any, layers: Sequence[int], label: str) -> None:
    """A layer axis: ``label``, integer ticks only, limits hugging ``layers`` (no empty slot beside the data)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(layers):
        low, high = min(layers), max(layers)
        ax.set_xlim(low - 0.3, high + 0.3)


def tick_values(ax: Any) -> list[float]:
    """The x tick values shown within the axis' limits."""
    low, high = sorted(ax.get_xlim())
    return [float(t) for t in ax.get_xticks() if low <= t <= high]
