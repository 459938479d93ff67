"""Knockout sweeps: one generic function that knocks out any flow in a window around every centre layer."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from mmflow.engines import get_engine, knockout_attention
from mmflow.errors import MmflowError
from mmflow.fast import Clean, clean_run
from mmflow.inputs import Encoded
from mmflow.models import LlavaModel, num_layers
from mmflow.paper import FLOWS, Flow, default_window, flow_name, flow_parts, window_layers


def flow_positions(
    flow: Flow, groups: Mapping[str, Sequence[int]], length: int | None = None
) -> tuple[list[int], list[int]]:
    """(sources, targets) positions of a flow (see :func:`~mmflow.paper.flow_parts`).

    Args:
        flow: the flow.
        groups: the example's token groups.
        length: the sequence length, to check explicit positions against.

    Raises:
        MmflowError: for an unknown group, an empty group, a position outside the sequence, or a flow that would
            leave a position no key.

    Example:
        >>> flow_positions("Image->Last", {"image": [1, 2], "last": [5]})
        ([1, 2], [5])
    """
    parts = flow_parts(flow, groups)
    out = []
    for part in parts:
        if isinstance(part, str):
            if part not in groups:
                raise MmflowError(f"Unknown group {part!r} in flow {flow!r}; this example has {sorted(groups)}")
            out.append(sorted(groups[part]))
        else:
            out.append(sorted(int(p) for p in part))
    sources, targets = out
    outside = [p for p in sources + targets if p < 0 or (length is not None and p >= length)]
    if outside:
        raise MmflowError(f"Flow {flow!r}: positions {outside} lie outside the sequence (0..{(length or 1) - 1})")
    if not sources or not targets:
        raise MmflowError(f"Flow {flow!r} has an empty group (sources {len(sources)}, targets {len(targets)})")
    for t in targets:  # a query row that keeps no key is undefined (NaN / uniform attention): refuse it
        if set(range(t + 1)) <= set(sources):
            raise MmflowError(f"Flow {flow!r} would block every key of position {t}")
    return sources, targets


def check_window_keys(model: LlavaModel, flows: Sequence[tuple[str, tuple[list[int], list[int]]]]) -> None:
    """Refuse a flow that would leave a target no key in the model's sliding-window layers (Gemma 3), where a
    position sees only the last ``sliding_window`` positions (and, for an image token, the rest of its image).

    Conservative: a target whose whole window is cut is refused even if later tokens of its image remain.

    Raises:
        MmflowError: naming the flow, the position and the window.
    """
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if window is None or "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
        return
    for name, (sources, targets) in flows:
        blocked = set(sources)
        for t in targets:
            if set(range(max(0, t - window + 1), t + 1)) <= blocked:
                raise MmflowError(
                    f"Flow {name!r} would block every key of position {t} in the sliding-window layers, which see "
                    f"only the last {window} positions"
                )


def has_empty_group(flow: Flow, groups: Mapping[str, Sequence[int]]) -> bool:
    """True if a named flow's source or target group exists but is empty for this example (e.g. no related
    patches because the question's objects are not in the image).

    Example:
        >>> has_empty_group("Related patches->Question", {"related_patches": [], "question": [4]})
        True
    """
    return any(isinstance(p, str) and p in groups and not groups[p] for p in flow_parts(flow, groups))


def first_target(flows: Sequence[Flow], encoded: Encoded) -> int | None:
    """The first target position of the flows this example resolves (a flow naming a group its encoding lacks or
    leaves empty is passed over); None if it resolves none. The fast engine needs clean hidden states from there on.

    Example:
        >>> import torch
        >>> enc = Encoded({"input_ids": torch.zeros(1, 6)}, {"image": [0, 1], "question": [2, 3], "last": [5]}, "")
        >>> first_target(["Image->Last", "Image->Question", "Related patches->Question"], enc)
        2
    """
    firsts = []
    for flow in flows:
        with contextlib.suppress(MmflowError):
            if not has_empty_group(flow, encoded.groups):
                firsts.append(min(flow_positions(flow, encoded.groups, encoded.length)[1]))
    return min(firsts, default=None)


def clean_run_for(model: LlavaModel, encoded: Encoded, engine: str, keep_from: int) -> Clean:
    """The clean run :func:`knockout_sweep` makes for ``engine`` (under the same attention), keeping hidden states
    from ``keep_from`` on: one clean run that the sweeps of several flow sets on this example can share (pass it as
    their ``clean``; it is read, never changed)."""
    with torch.inference_mode(), knockout_attention(model):
        return clean_run(model, encoded, keep_cache=get_engine(engine).needs_cache, keep_from=keep_from)


def check_flows(flows: Sequence[Flow]) -> None:
    """Raise unless ``flows`` is a non-empty list (a single string is a common slip).

    Raises:
        MmflowError: naming the parameter.
    """
    if isinstance(flows, str) or not flows:
        raise MmflowError(f"flows must be a non-empty list of {list(FLOWS)} or 'group->group', got {flows!r}")


def check_window(window: int) -> int:
    """``window`` if it is a positive integer.

    Raises:
        MmflowError: naming the parameter otherwise.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MmflowError(
            f"window must be a positive integer number of layers (or None for the paper's rule), got {window!r}"
        )
    return window


def knockout_sweep(
    model: LlavaModel,
    encoded: Encoded,
    flows: Sequence[Flow] = tuple(FLOWS),
    window: int | None = None,
    engine: str = "fast",
    layers: Sequence[int] | None = None,
    token_budget: int | None = None,
    clean: Clean | None = None,
) -> pd.DataFrame:
    """Knock out each flow in a window of ``window`` layers centred on every layer (or on ``layers``).

    Args:
        model: a loaded LLaVA-family model.
        encoded: the example's input and groups (:func:`~mmflow.inputs.encode_example`).
        flows: names from :data:`~mmflow.paper.FLOWS`, ``"group->group"`` strings, or (sources, targets) pairs.
        window: window size k; None: :func:`~mmflow.paper.default_window` of the model's depth.
        engine: a name in :data:`~mmflow.engines.ENGINES` (``"fast"`` or ``"naive"``; same results).
        layers: centre layers (default: every layer).
        token_budget: the fast engine's most suffix tokens per pass; None: ``$MMFLOW_TOKEN_BUDGET`` if set, else
            what fits in a quarter of the device's free memory (:func:`~mmflow.budget.token_budget_for`).
        clean: a :func:`~mmflow.engines.clean_run` to reuse (with ``keep_cache=True`` for the fast engine).

    Returns:
        One row per (flow, centre layer): ``flow, layer, window_start, window_end, k, answer_token, p_base, p_new,
        rel_change`` with ``rel_change = (p_new - p_base) / p_base * 100``; p is the probability of the model's own
        greedy first answer token.

    Raises:
        MmflowError: for an unknown engine, a bad window, centre layers out of range, no flows, or a bad flow
            (also one that leaves a position no key in a sliding-window layer: :func:`check_window_keys`).
    """
    sweep = get_engine(engine)
    n_layers = num_layers(model)
    k = default_window(n_layers) if window is None else check_window(window)
    centres = list(range(n_layers)) if layers is None else [int(c) for c in layers]
    if any(not 0 <= c < n_layers for c in centres):
        raise MmflowError(f"layers must lie in 0..{n_layers - 1} for this {n_layers}-layer model, got {centres}")
    check_flows(flows)
    windows = [window_layers(c, k, n_layers) for c in centres]
    resolved = [(flow_name(flow), flow_positions(flow, encoded.groups, encoded.length)) for flow in flows]
    check_window_keys(model, resolved)
    rows = []
    with torch.inference_mode(), knockout_attention(model) as base:
        keep_from = min(min(targets) for _, (_, targets) in resolved)
        clean = clean or clean_run(model, encoded, keep_cache=sweep.needs_cache, keep_from=keep_from)
        probs = sweep.sweep(
            model, encoded, clean, base, [positions for _, positions in resolved], windows, token_budget
        )
        for (name, _), flow_probs in zip(resolved, probs):
            for centre, layers_, p_new in zip(centres, windows, flow_probs):
                rows.append(
                    {
                        "flow": name,
                        "layer": centre,
                        "window_start": layers_.start,
                        "window_end": layers_.stop - 1,
                        "k": k,
                        "answer_token": clean.answer_token,
                        "p_base": clean.p_base,
                        "p_new": p_new,
                        "rel_change": (p_new - clean.p_base) / clean.p_base * 100,
                    }
                )
    order = {name: i for i, (name, _) in enumerate(resolved)}
    return pd.DataFrame(rows).sort_values(
        ["flow", "layer"], key=lambda col: col.map(order) if col.name == "flow" else col, ignore_index=True
    )
