"""The fast knockout engine: exact reuse of the clean run, in positions and in layers.

A knockout whose targets start at position ``t0`` and whose window starts at layer ``a`` changes nothing before
``t0`` (attention is causal) and nothing below ``a``. So for each window only the suffix ``[t0, n)`` is
recomputed, only from layer ``a`` on, starting from its clean hidden states there, against the clean keys and
values of the prefix. The windows of a sweep share one pass through the layers: each enters as a copy of the
suffix at its first layer (:class:`SuffixCopies`), so no layer below a window is recomputed for it and each
layer is called once per pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmflow.cache import env_token_budget
from mmflow.errors import MmflowError
from mmflow.inputs import Encoded
from mmflow.models import LlavaModel, decoder_layers, final_norm, num_layers, rotary_embedding

_NEG = -math.inf


@dataclass
class Clean:
    """The clean run of one example: the answer token, its probability and what the fast engine reuses.

    ``cache`` holds the clean keys and values of every layer (read, never changed); ``hidden`` the input of every
    decoder layer at positions ``keep_from`` and later, shape ``(layers, positions, hidden size)``.
    """

    answer_token: int
    p_base: float
    cache: Any = None
    hidden: torch.Tensor | None = None
    keep_from: int = 0


def clean_run(model: LlavaModel, encoded: Encoded, keep_cache: bool = False, keep_from: int = 0) -> Clean:
    """One forward without knockout; the answer is the greedy first token at the last position.

    Args:
        model: a loaded LLaVA-family model.
        encoded: the example.
        keep_cache: keep the K/V cache and each layer's input hidden states (what the fast engine reuses).
        keep_from: keep hidden states from this position on (the fast engine needs them from a flow's first target).
    """
    out = model(**encoded.inputs, use_cache=keep_cache, output_hidden_states=keep_cache, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    answer = int(logits.argmax())
    p_base = float(torch.softmax(logits, -1)[answer])
    if keep_cache:
        hidden = torch.stack(out.hidden_states[: num_layers(model)])[:, 0, keep_from:]  # [a] = input of layer a
        return Clean(answer, p_base, out.past_key_values, hidden, keep_from)
    return Clean(answer, p_base)


class _Flow:
    """One flow's suffix ``[t0, t0 + s)`` and where its knockout cuts, in suffix rows and prefix columns."""

    def __init__(self, cache: Any, sources: Sequence[int], targets: Sequence[int], length: int, device: Any):
        self.t0 = min(targets)
        self.s = length - self.t0
        self.prefix = [(layer.keys[..., : self.t0, :], layer.values[..., : self.t0, :]) for layer in cache.layers]
        self.positions = positions = self.t0 + torch.arange(self.s, device=device)
        sources_t = torch.tensor(list(sources), device=device)
        target_rows = torch.isin(positions, torch.tensor(list(targets), device=device))
        self.target_offsets = sorted(t - self.t0 for t in set(targets))  # on the host: no device sync per layer
        prefix_cols = sorted(c for c in set(sources) if c < self.t0)
        self.prefix_sources = torch.isin(torch.arange(self.t0, device=device), sources_t)
        runs: list[tuple[int, int]] = []  # the cut prefix columns as contiguous runs (one for the image block)
        for c in prefix_cols:
            if runs and runs[-1][1] == c:
                runs[-1] = (runs[-1][0], c + 1)
            else:
                runs.append((c, c + 1))
        self.prefix_runs = runs
        self.causal = torch.ones(self.s, self.s, dtype=torch.bool, device=device).tril()
        self.own_cut = target_rows[:, None] & torch.isin(positions, sources_t)[None, :] & self.causal

    def attend(self, layer: int, query, key, value, scaling: float, active: list[bool]) -> torch.Tensor:
        """Attention of this flow's copies (``active``: whose window contains ``layer``) over the clean prefix and
        each copy's own rows; softmax in float32. Shapes: query ``(1, heads, T, d)``, key and value ``(1, kv heads,
        T, d)``; returns ``(1, T, heads, d)``."""
        heads, kv_heads, t, d = query.shape[1], key.shape[1], query.shape[2], query.shape[3]
        rep, g, s = heads // kv_heads, len(active), self.s
        prefix_keys, prefix_values = self.prefix[layer]
        q = (query.float() * scaling).reshape(kv_heads, rep * t, d)  # head h reads kv head h // rep
        on_prefix = q @ prefix_keys[0].float().transpose(-1, -2)  # (kv heads, rep * T, t0)
        cut = [w * s + r for w, on in enumerate(active) if on for r in self.target_offsets]
        if cut and self.prefix_runs:  # fill the cut rows only: few of T in most layers
            rows = torch.tensor(cut, device=query.device)
            grid = on_prefix.view(kv_heads, rep, t, -1)
            if len(self.prefix_runs) <= 4:
                for start, stop in self.prefix_runs:
                    grid[..., start:stop].index_fill_(2, rows, _NEG)
            else:  # scattered columns (e.g. patches)
                grid.index_copy_(2, rows, grid.index_select(2, rows).masked_fill_(self.prefix_sources, _NEG))
        active_t = torch.tensor(active, device=query.device)
        on_own = q.view(kv_heads, rep, g, s, d) @ key[0].float().view(kv_heads, 1, g, s, d).transpose(-1, -2)
        on_own.masked_fill_(~self.causal | (active_t[:, None, None] & self.own_cut[None]), _NEG)
        on_own = on_own.view(kv_heads, rep * t, s)
        top = torch.maximum(on_prefix.amax(-1, keepdim=True), on_own.amax(-1, keepdim=True))
        on_prefix = on_prefix.sub_(top).exp_()
        on_own = on_own.sub_(top).exp_()
        total = on_prefix.sum(-1, keepdim=True) + on_own.sum(-1, keepdim=True)
        own = on_own.view(kv_heads, rep, g, s, s) @ value[0].float().view(kv_heads, 1, g, s, d)
        out = (on_prefix @ prefix_values[0].float() + own.view(kv_heads, rep * t, d)) / total
        return out.view(1, heads, t, d).transpose(1, 2).to(query.dtype)


class SuffixCopies:
    """Copies of the flows' suffixes, one per (flow, window), laid out along the sequence, flow after flow.

    Each copy attends to its flow's clean prefix (read from the clean cache) and to itself, never to another
    copy, so attention costs what the copy alone would. Passed to a decoder layer as its cache (``update``
    hands back the copies' own keys and values and stores nothing) and, as ``copies=``, to the knockout
    attention, which calls it. ``present`` lists, per flow, which of its copies' windows contain the layer
    being computed.
    """

    def __init__(self) -> None:
        self.present: list[tuple[_Flow, list[bool]]] = []
        self.calls = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The copies' own keys and values, unchanged (the prefixes join in :meth:`__call__`)."""
        return keys, values

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
        """Attention of every present copy (see :meth:`_Flow.attend`); returns ``((1, T, heads, d), None)``."""
        self.calls += 1
        out, start = [], 0
        for flow, active in self.present:
            rows = slice(start, start + len(active) * flow.s)
            out.append(
                flow.attend(module.layer_idx, query[:, :, rows], key[:, :, rows], value[:, :, rows], scaling, active)
            )
            start = rows.stop
        return torch.cat(out, 1), None


def device_token_budget(model: LlavaModel, prefix: int, fraction: float = 0.25, cap: int = 8192) -> int:
    """Most suffix tokens per pass that fit in ``fraction`` of the device's free memory.

    Per token: one layer's activations and its float32 attention scores over the prefix. Rounded down to a
    power of two (so small changes in free memory do not change the grouping) and capped at ``cap``.
    """
    config = model.config.get_text_config()
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    width = torch.finfo(model.dtype).bits // 8
    per_token = (8 * config.hidden_size + 3 * config.intermediate_size) * width
    per_token += 3 * config.num_attention_heads * (prefix + 1) * 4  # float32 scores, their exponentials, masks
    tokens = 1
    while tokens < cap and 2 * tokens * per_token <= fraction * free:
        tokens *= 2
    return tokens


def token_budget_for(model: LlavaModel, prefix: int, token_budget: int | None) -> int:
    """``token_budget`` if given, else ``$MMFLOW_TOKEN_BUDGET`` if set (:func:`env_token_budget`), else
    :func:`device_token_budget`.

    Raises:
        MmflowError: for a budget that is not a positive integer, naming where it came from.
    """
    if token_budget is None:
        return env_token_budget() or device_token_budget(model, prefix)
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise MmflowError(
            "token_budget must be a positive integer number of tokens (or None: from free memory), "
            f"got {token_budget!r}"
        )
    return token_budget


def fast_sweep(
    model: LlavaModel,
    encoded: Encoded,
    clean: Clean,
    base: str,
    flows: Sequence[tuple[list[int], list[int]]],
    windows: Sequence[range],
    token_budget: int | None,
) -> list[list[float]]:
    """The fast engine (see the module docstring): every (flow, window) is a copy of the flow's suffix that
    enters the pass at the window's first layer. Copies are packed into passes of at most ``token_budget``
    suffix tokens (see :func:`token_budget_for`) in the order of their first layer; a window without
    layers leaves ``p_base``. Needs :func:`~mmflow.engines.knockout_attention` around it, like every engine."""
    n_layers, keep_from = num_layers(model), clean.keep_from
    device = clean.hidden.device if clean.hidden is not None else model.device
    sliding = getattr(model.config.get_text_config(), "sliding_window", None)
    if sliding is not None and encoded.length > sliding:  # its attention sees every earlier position
        raise MmflowError(
            f"The language model attends within a sliding window of {sliding} positions and this input has "
            f"{encoded.length}: the fast engine does not implement sliding windows; use engine='naive'"
        )
    late = [min(targets) for _, targets in flows if clean.hidden is None or min(targets) < keep_from]
    if late:
        raise MmflowError(
            f"This clean run keeps hidden states from position {keep_from}, after a flow's first target "
            f"{min(late)}: pass clean_run(..., keep_cache=True, keep_from={min(late)}) or lower"
        )
    prepared = [_Flow(clean.cache, sources, targets, encoded.length, device) for sources, targets in flows]
    starts = [w.start if len(w) else n_layers for w in windows]
    jobs = sorted(
        ((f, i) for f in range(len(flows)) for i in range(len(windows)) if starts[i] < n_layers),
        key=lambda job: (starts[job[1]], job[0]),
    )
    budget = token_budget_for(model, min(flow.t0 for flow in prepared), token_budget)
    probs = [[clean.p_base] * len(windows) for _ in flows]  # a window without layers changes nothing
    while jobs:
        size, taken = 0, 0
        while taken < len(jobs) and (taken == 0 or size + prepared[jobs[taken][0]].s <= budget):
            size += prepared[jobs[taken][0]].s
            taken += 1
        batch, jobs = jobs[:taken], jobs[taken:]
        for (f, i), p in zip(*_one_pass(model, clean, prepared, batch, starts, windows)):
            probs[f][i] = p
    return probs


def _one_pass(model, clean: Clean, flows: list[_Flow], jobs: list[tuple[int, int]], starts, windows):
    """Run the copies of ``jobs`` (sorted by first layer) up the layers; return them in output order and their
    probabilities of the clean answer."""
    layers = decoder_layers(model)
    copies = SuffixCopies()
    members: list[list[int]] = [[] for _ in flows]  # window indices of each flow's copies, in entering order
    segments: list[torch.Tensor | None] = [None] * len(flows)
    waiting = list(jobs)
    for j in range(starts[jobs[0][1]], len(layers)):
        entering = [job for job in waiting if starts[job[1]] == j]
        if entering:
            waiting = waiting[len(entering) :]
            for f, i in entering:
                new = clean.hidden[j, flows[f].t0 - clean.keep_from :][None]
                segments[f] = new if segments[f] is None else torch.cat([segments[f], new], 1)
                members[f].append(i)
            live = [f for f in range(len(flows)) if members[f]]
            positions = torch.cat([flows[f].positions.repeat(len(members[f])) for f in live])[None]
            hidden = torch.cat([segments[f] for f in live], 1)
            embeddings = rotary_embedding(model)(hidden, positions)
        copies.present = [(flows[f], [j in windows[i] for i in members[f]]) for f in live]
        calls = copies.calls
        hidden = layers[j](
            hidden,
            attention_mask=None,
            position_ids=positions,
            past_key_values=copies,
            use_cache=True,
            position_embeddings=embeddings,
            copies=copies,
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if copies.calls == calls:
            raise MmflowError("The fast engine runs only inside knockout_attention(model) (see mmflow.engines)")
        pieces = torch.split(hidden, [len(members[f]) * flows[f].s for f in live], 1)
        for f, piece in zip(live, pieces):
            segments[f] = piece
    last = torch.cat([segments[f][0, flows[f].s - 1 :: flows[f].s] for f in live])
    logits = model.get_output_embeddings()(final_norm(model)(last)).float()
    order = [(f, i) for f in live for i in members[f]]
    return order, torch.softmax(logits, -1)[:, clean.answer_token].tolist()
