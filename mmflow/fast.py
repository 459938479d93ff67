"""The fast knockout engine: exact reuse of the clean run, in positions and in layers.

A knockout whose targets start at position ``t0`` and whose window starts at layer ``a`` changes nothing before
``t0`` (attention is causal) and nothing below ``a``. So for each window only the suffix ``[t0, n)`` is
recomputed, only from layer ``a`` on, starting from its clean hidden states there, against the clean keys and
values of the prefix. The windows of a sweep share one pass through the layers: each enters as a copy of the
suffix at its first layer (:class:`SuffixCopies`), so no layer below a window is recomputed for it and each
layer is called once per pass. Windows that enter at the same layer share one copy until they differ (the edge
windows truncated at layer 0); a cut row attends only to the prefix columns it keeps; at the top layer only the
last row is attended and passed through the MLP (also in the clean run). Attention over the prefix is PyTorch's
fused kernel on the CPU, joined with each copy's own rows by log-sum-exp."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmflow.budget import token_budget_for
from mmflow.errors import MmflowError
from mmflow.inputs import Encoded
from mmflow.models import (
    LlavaModel,
    check_reusable_from,
    decoder_layers,
    final_norm,
    layer_mlp,
    num_layers,
    position_ids,
    rotary_embedding,
)

_NEG = -math.inf


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or in its own dtype if that is wider (float64 stays float64).

    Example:
        >>> wide(torch.ones(1, dtype=torch.float16)).dtype, wide(torch.ones(1, dtype=torch.float64)).dtype
        (torch.float32, torch.float64)
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


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
    top = contextlib.nullcontext()
    if keep_cache:  # the engine reads every layer's input and keys and values, but only the last row's output
        top = rows_only(
            layer_mlp(model, num_layers(model) - 1), torch.tensor([encoded.length - 1], device=model.device)
        )
    with top:
        out = model(**encoded.inputs, use_cache=keep_cache, output_hidden_states=keep_cache, logits_to_keep=1)
    logits = wide(out.logits[0, -1])
    answer = int(logits.argmax())
    p_base = float(torch.softmax(logits, -1)[answer])
    if keep_cache:
        hidden = torch.stack([h[0, keep_from:] for h in out.hidden_states[: num_layers(model)]])  # [a]: layer a's input
        return Clean(answer, p_base, out.past_key_values, hidden, keep_from)
    return Clean(answer, p_base)


class _Suffix:
    """The positions ``[t0, n)`` that the flows whose first target is ``t0`` recompute, and the clean prefix
    ``[0, t0)`` that their copies attend to."""

    def __init__(self, cache: Any, t0: int, length: int, device: Any, rope: torch.Tensor):
        self.t0, self.s = t0, length - t0
        self.prefix = [(layer.keys[..., :t0, :], layer.values[..., :t0, :]) for layer in cache.layers]
        self.positions = t0 + torch.arange(self.s, device=device)
        self.rope = rope[:, t0:].to(device)  # the suffix's rotary position ids, (P, s) (see models.position_ids)
        self.causal = torch.ones(self.s, self.s, dtype=torch.bool, device=device).tril()

    def attend(self, layer: int, query, key, value, scaling: float, parts: list, last_only: bool = False):
        """Attention of the copies of ``parts`` (per flow, whether each of its copies' windows contains
        ``layer``), laid out flow after flow, over the clean prefix and each copy's own rows, joined by their
        log-sum-exp in float32 or wider (:func:`wide`). A cut row reads only the prefix columns its flow keeps.
        ``last_only``: only each copy's last row (the top layer; the other rows come back as zeros, nothing reads
        them). Shapes: query ``(1, heads, T, d)``, key and value ``(1, kv heads, T, d)``; returns
        ``(1, T, heads, d)``."""
        heads, kv_heads, t, d = query.shape[1], key.shape[1], query.shape[2], query.shape[3]
        rep, g, s = heads // kv_heads, sum(len(active) for _, active in parts), self.s
        offsets = range(s - 1, s) if last_only else range(s)  # the rows computed, within each copy
        m, rows_in = len(offsets), slice(offsets.start, offsets.stop)
        q = query.reshape(1, kv_heads, rep, g, s, d)  # head h reads kv head h // rep
        q = q[:, :, :, :, s - 1 :] if last_only else q
        flat = q.reshape(1, kv_heads, rep * g * m, d)
        cuts, first = [], 0  # per flow that cuts prefix columns in this layer: its rows and what they read
        for flow, active in parts:
            cut_in = [i for i, o in enumerate(offsets) if o in flow.target_set]
            if flow.prefix_runs and cut_in and any(active):
                on = [first + w for w, inside in enumerate(active) if inside]
                cuts.append(([(r * g + w) * m + i for r in range(rep) for w in on for i in cut_in], flow.kept(layer)))
            first += len(active)
        if not cuts:  # no row loses a prefix column in this layer
            out_p, lse_p = _attention_lse(flat, [self.prefix[layer]], scaling)
        else:
            out_p = wide(flat.new_zeros(flat.shape))
            lse_p = out_p.new_full(flat.shape[:-1], _NEG)
            cut_set = {i for rows, _ in cuts for i in rows}
            keep = [i for i in range(flat.shape[2]) if i not in cut_set]
            for rows, blocks in [(keep, [self.prefix[layer]]), *cuts]:
                if rows and blocks:  # (a cut row that keeps no prefix column reads only its copy)
                    index = _on_device(rows, query.device)
                    o, lse = _attention_lse(flat.index_select(2, index), blocks, scaling)
                    out_p.index_copy_(2, index, o)
                    lse_p.index_copy_(2, index, lse)
        own_keys = wide(key).view(1, kv_heads, 1, g, s, d)
        scores = (wide(q) @ own_keys.transpose(-1, -2)).mul_(scaling)  # (1, kv heads, rep, g, m, s)
        active_t = _on_device([inside for _, active in parts for inside in active], query.device)
        own_cut = torch.cat([flow.own_cut[rows_in].expand(len(active), m, s) for flow, active in parts])
        scores.masked_fill_(~self.causal[rows_in] | (active_t[:, None, None] & own_cut), _NEG)
        lse_p = lse_p.view(1, kv_heads, rep, g, m, 1)
        top = torch.maximum(lse_p, scores.amax(-1, keepdim=True))
        weights = scores.sub_(top).exp_()
        from_prefix = (lse_p - top).exp_()
        own = weights @ wide(value).view(1, kv_heads, 1, g, s, d)
        out = (out_p.view(1, kv_heads, rep, g, m, d) * from_prefix + own) / (
            from_prefix + weights.sum(-1, keepdim=True)
        )
        if last_only:
            out = torch.cat([out.new_zeros(1, kv_heads, rep, g, s - 1, d), out], 4)
        return out.reshape(1, heads, t, d).transpose(1, 2).to(query.dtype)


class _Flow:
    """Where one flow's knockout cuts within its :class:`_Suffix`: target rows and prefix columns."""

    def __init__(self, suffix: _Suffix, sources: Sequence[int], targets: Sequence[int], device: Any):
        self.suffix, self.t0, self.s, self.positions = suffix, suffix.t0, suffix.s, suffix.positions  # read-only
        sources_t = torch.tensor(sorted(set(sources)), device=device)
        target_rows = torch.isin(self.positions, torch.tensor(sorted(set(targets)), device=device))
        self.target_set = {t - self.t0 for t in targets}  # on the host: no device sync per layer
        cut_cols = {c for c in sources if c < self.t0}
        self.prefix_runs = _runs(sorted(cut_cols))  # the cut prefix columns as contiguous runs (the image block)
        self.kept_runs = _runs([c for c in range(self.t0) if c not in cut_cols])  # what a cut row still reads
        kept_columns = sum(b - a for a, b in self.kept_runs)  # as views: one run (or none), or a few long ones
        self._kept_as_views = len(self.kept_runs) <= 1 or (len(self.kept_runs) <= 4 and kept_columns > self.t0 // 8)
        self._kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.own_cut = target_rows[:, None] & torch.isin(self.positions, sources_t)[None, :] & suffix.causal

    def kept(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The clean prefix keys and values a cut row still reads (the columns that are not sources), as blocks:
        views of the cache for one run (or none) or a few long ones, else one gathered copy (kept for the sweep; at
        most an eighth of the prefix unless the runs are many)."""
        keys, values = self.suffix.prefix[layer]
        if self._kept_as_views:
            return [(keys[..., a:b, :], values[..., a:b, :]) for a, b in self.kept_runs]
        if layer not in self._kept:
            cols = torch.cat([torch.arange(a, b, device=keys.device) for a, b in self.kept_runs])
            self._kept[layer] = [(keys.index_select(2, cols), values.index_select(2, cols))]
        return self._kept[layer]


def _on_device(values: list, device: Any) -> torch.Tensor:
    """A host list as a tensor on ``device``; to a GPU through pinned memory without waiting for the copy, so
    building the pass's indices does not stall the device's queue."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def _attention_lse(query, blocks, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every ``query`` row over the keys and values of all ``blocks`` together, and each
    row's log-sum-exp, in float32 or wider (blocks joined by their log-sum-exp). On the CPU each block is
    PyTorch's fused flash kernel (which returns the log-sum-exp), elsewhere plain matrix products. Shapes: query
    ``(1, h, rows, d)``, each block's keys and values ``(1, h, columns, d)``; returns ``(1, h, rows, d)`` and
    ``(1, h, rows)``."""
    parts = []
    for key, value in blocks:
        if query.device.type == "cpu" and _CPU_FLASH is not None:
            out, lse = _CPU_FLASH(query, key, value, 0.0, False, scale=scale)
            parts.append((wide(out), wide(lse)))
        else:
            scores = (wide(query) @ wide(key).transpose(-1, -2)).mul_(scale)
            lse = torch.logsumexp(scores, -1)
            parts.append((scores.sub_(lse[..., None]).exp_() @ wide(value), lse))
    if len(parts) == 1:
        return parts[0]
    lse = functools.reduce(torch.logaddexp, [lse for _, lse in parts])
    return sum(out * (part_lse - lse).exp()[..., None] for out, part_lse in parts), lse


#: PyTorch's fused CPU attention that also returns the log-sum-exp (None where this PyTorch lacks it)
try:
    _CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - older PyTorch
    _CPU_FLASH = None


@contextlib.contextmanager
def rows_only(module: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module`` (one that works row by row, as a decoder layer's MLP) computes only ``rows``
    of its input's sequence dimension; the other rows of its output are zeros. The hooks are removed on exit,
    also on error.

    Example:
        >>> mlp = torch.nn.Linear(2, 2)
        >>> with rows_only(mlp, torch.tensor([1])):
        ...     out = mlp(torch.ones(1, 3, 2))
        >>> out[0, 0].abs().sum().item(), torch.equal(out[0, 1], mlp(torch.ones(2))), out.shape
        (0.0, True, torch.Size([1, 3, 2]))
    """
    lengths: list[int] = []

    def before(_, args):
        lengths.append(args[0].shape[1])
        return (args[0].index_select(1, rows), *args[1:])

    def after(_, args, out):
        return out.new_zeros(out.shape[0], lengths.pop(), *out.shape[2:]).index_copy_(1, rows, out)

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _runs(columns: list[int]) -> list[tuple[int, int]]:
    """Sorted columns as contiguous ``(start, stop)`` runs.

    Example:
        >>> _runs([0, 1, 2, 5, 7, 8])
        [(0, 3), (5, 6), (7, 9)]
    """
    runs: list[tuple[int, int]] = []
    for c in columns:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


class SuffixCopies:
    """Copies of the flows' suffixes, one per (flow, window), laid out along the sequence, flow after flow.

    Each copy attends to its flow's clean prefix (read from the clean cache) and to itself, never to another
    copy, so attention costs what the copy alone would. Passed to a decoder layer as its cache (``update``
    hands back the copies' own keys and values and stores nothing) and, as ``copies=``, to the knockout
    attention, which calls it. ``present`` lists, per suffix and per flow in it, which of its copies' windows
    contain the layer being computed; at ``top_layer`` only each copy's last row is attended (nothing reads the
    others).
    """

    def __init__(self, top_layer: int) -> None:
        self.present: list[tuple[_Suffix, list[tuple[_Flow, list[bool]]]]] = []
        self.top_layer = top_layer
        self.calls = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The copies' own keys and values, unchanged (the prefixes join in :meth:`__call__`)."""
        return keys, values

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
        """Attention of every present copy (see :meth:`_Suffix.attend`); returns ``((1, T, heads, d), None)``."""
        self.calls += 1
        out, start, layer = [], 0, module.layer_idx
        for suffix, parts in self.present:
            rows = slice(start, start + sum(len(active) for _, active in parts) * suffix.s)
            q, k, v = query[:, :, rows], key[:, :, rows], value[:, :, rows]
            out.append(suffix.attend(layer, q, k, v, scaling, parts, last_only=layer == self.top_layer))
            start = rows.stop
        return torch.cat(out, 1), None


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
    check_reusable_from(model, encoded.inputs, min((min(targets) for _, targets in flows), default=encoded.length))
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
    suffixes: dict[int, _Suffix] = {}  # flows with the same first target share a suffix and attention calls
    prepared, rope = [], position_ids(model, encoded.inputs)
    for sources, targets in flows:
        t0 = min(targets)
        if t0 not in suffixes:
            suffixes[t0] = _Suffix(clean.cache, t0, encoded.length, device, rope)
        prepared.append(_Flow(suffixes[t0], sources, targets, device))
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
    """Run the copies of ``jobs`` (sorted by first layer) up the layers; return the jobs in output order and their
    probabilities of the clean answer.

    Windows of a flow that enter at the same layer share one copy until their windows differ at a layer (the
    edge windows truncated at layer 0, repeated windows): then the copy is split in two.
    """
    layers = decoder_layers(model)
    copies = SuffixCopies(top_layer=len(layers) - 1)
    members: list[list[list[int]]] = [[] for _ in flows]  # per flow, its copies: the windows each one computes
    segments: list[torch.Tensor | None] = [None] * len(flows)
    waiting = list(jobs)
    for j in range(starts[jobs[0][1]], len(layers)):
        changed = False
        entering = [job for job in waiting if starts[job[1]] == j]
        if entering:
            waiting = waiting[len(entering) :]
            for f in sorted({f for f, _ in entering}):  # all enter from the same clean state: one copy per flow
                new = clean.hidden[j, flows[f].t0 - clean.keep_from :][None]
                segments[f] = new if segments[f] is None else torch.cat([segments[f], new], 1)
                members[f].append([i for g, i in entering if g == f])
            changed = True
        for f, copies_f in enumerate(members):
            split = [([i for i in c if j in windows[i]], [i for i in c if j not in windows[i]]) for c in copies_f]
            if any(inside and outside for inside, outside in split):
                source = [c for c, (inside, outside) in enumerate(split) for part in (inside, outside) if part]
                members[f] = [part for inside, outside in split for part in (inside, outside) if part]
                rows = torch.arange(flows[f].s, device=segments[f].device)
                index = torch.cat([c * flows[f].s + rows for c in source])
                segments[f] = segments[f].index_select(1, index)
                changed = True
        if changed:
            live = sorted((f for f in range(len(flows)) if members[f]), key=lambda f: (flows[f].t0, f))
            positions = torch.cat([flows[f].suffix.rope.repeat(1, len(members[f])) for f in live], 1)
            positions = positions[:, None] if len(positions) > 1 else positions  # M-RoPE: (3, 1, T); else (1, T)
            hidden = torch.cat([segments[f] for f in live], 1)
            embeddings = rotary_embedding(model)(hidden, positions)
        copies.present = []
        for f in live:  # grouped by suffix (live is sorted by first target)
            part = (flows[f], [j in windows[c[0]] for c in members[f]])
            if copies.present and copies.present[-1][0] is flows[f].suffix:
                copies.present[-1][1].append(part)
            else:
                copies.present.append((flows[f].suffix, [part]))
        calls, top = copies.calls, contextlib.nullcontext()
        if j == copies.top_layer:  # above the top layer nothing reads a row but each copy's last
            ends = itertools.accumulate(flows[f].s for f in live for _ in members[f])
            top = rows_only(layer_mlp(model, j), _on_device([end - 1 for end in ends], hidden.device))
        with top:
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
    logits = wide(model.get_output_embeddings()(final_norm(model)(last)))
    probs = iter((logits[:, clean.answer_token] - torch.logsumexp(logits, -1)).exp().tolist())  # layout order
    order = [((f, i), p) for f in live for c, p in zip(members[f], probs) for i in c]
    return [job for job, _ in order], [p for _, p in order]
