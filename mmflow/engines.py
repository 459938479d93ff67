"""Attention knockout: the primitive (a block mask per layer merged into the model's own mask) and the engines
that sweep it over layer windows.

The one-off intervention is two lines at the call site::

    with knockout_attention(model):
        out = model(**enc.inputs, knockout=Knockout({layer: block_mask([(targets, sources)], n, n)}))

Engines are registered in :data:`ENGINES`, each a function of one signature (see :class:`Engine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmflow.errors import MmflowError
from mmflow.inputs import Encoded
from mmflow.models import LlavaModel, eager_attention, family_of

#: A ``(1, 1, q_len, kv_len)`` bool tensor, True = the edge (query row -> key column) is cut.
BlockMask = torch.Tensor
_IMPL_PREFIX = "mmflow_knockout"


def block_mask(
    edges: Iterable[tuple[Sequence[int], Sequence[int]]], q_len: int, kv_len: int, device: Any = "cpu"
) -> BlockMask:
    """A block mask cutting every (query row, key column) of each ``(rows, cols)`` pair.

    Example:
        >>> block_mask([([2], [0, 1])], 3, 3)[0, 0].int().tolist()
        [[0, 0, 0], [0, 0, 0], [1, 1, 0]]
    """
    block = torch.zeros(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    for rows, cols in edges:
        block[0, 0, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    return block


class Knockout:
    """Per-layer block masks (see :func:`block_mask`), passed to the model as ``knockout=``.

    Example:
        >>> Knockout({3: block_mask([([2], [0])], 3, 3)}).get(4) is None
        True
    """

    def __init__(self, blocks: Mapping[int, BlockMask]):
        self.blocks = dict(blocks)

    def get(self, layer: int | None) -> BlockMask | None:
        """The block mask of ``layer`` (None if nothing is cut there)."""
        return self.blocks.get(layer)


def _merge_block(attention_mask: torch.Tensor | None, block: BlockMask, q_len: int, kv_len: int) -> torch.Tensor:
    """Add cut edges to a mask as the model gave it: None (implicit lower-right causal), bool, or additive float."""
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=block.device).tril(kv_len - q_len)[
            None, None
        ]
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~block
    return attention_mask.masked_fill(block, torch.finfo(attention_mask.dtype).min)


def _make_knockout_attention(base: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, knockout: Knockout | None = None, **kwargs):
        block = knockout.get(getattr(module, "layer_idx", None)) if knockout is not None else None
        if block is not None:
            attention_mask = _merge_block(attention_mask, block, query.shape[-2], key.shape[-2])
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_knockout_attention(model: LlavaModel, base: str) -> str:
    """Register the knockout attention over ``base`` ("sdpa" or "eager") and its mask builder; returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    if base == "sdpa":
        name, function, mask_fn = f"{_IMPL_PREFIX}_sdpa", sdpa_attention_forward, sdpa_mask
    else:
        name, function, mask_fn = f"{_IMPL_PREFIX}_eager_{family_of(model).name}", eager_attention(model), eager_mask
    AttentionInterface.register(name, _make_knockout_attention(function))
    AttentionMaskInterface.register(name, mask_fn)  # without it every mask arrives as None
    return name


@contextlib.contextmanager
def knockout_attention(model: LlavaModel) -> Iterator[str]:
    """Route the language model's attention through the knockout function; restore it on exit, also on error.

    Inside the block the model accepts ``knockout=Knockout(...)``; without it, it computes as before.

    Yields:
        The base implementation ("sdpa" or "eager") whose mask conventions apply.
    """
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    base = "eager" if previous == "eager" else "sdpa"
    model.set_attn_implementation({"text_config": _register_knockout_attention(model, base)})
    try:
        yield base
    finally:
        model.set_attn_implementation({"text_config": previous})


@dataclass
class Clean:
    """The clean run of one example: the answer token, its probability and what the fast engine reuses."""

    answer_token: int
    p_base: float
    cache: Any = None
    embeds: torch.Tensor | None = None


def clean_run(model: LlavaModel, encoded: Encoded, keep_cache: bool = False) -> Clean:
    """One forward without knockout; the answer is the greedy first token at the last position."""
    out = model(**encoded.inputs, use_cache=keep_cache, output_hidden_states=keep_cache, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    answer = int(logits.argmax())
    p_base = float(torch.softmax(logits, -1)[answer])
    if keep_cache:
        return Clean(answer, p_base, out.past_key_values, out.hidden_states[0])
    return Clean(answer, p_base)


def naive_sweep(
    model: LlavaModel,
    encoded: Encoded,
    clean: Clean,
    base: str,
    sources: list[int],
    targets: list[int],
    windows: Sequence[range],
    token_budget: int,
) -> list[float]:
    """The paper's method: one full forward (vision tower included) per window."""
    n = encoded.length
    block = block_mask([(targets, sources)], n, n, model.device)
    probs = []
    for layers in windows:
        out = model(**encoded.inputs, use_cache=False, logits_to_keep=1, knockout=Knockout({j: block for j in layers}))
        probs.append(float(torch.softmax(out.logits[0, -1].float(), -1)[clean.answer_token]))
    return probs


def _crop_to(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def fast_sweep(
    model: LlavaModel,
    encoded: Encoded,
    clean: Clean,
    base: str,
    sources: list[int],
    targets: list[int],
    windows: Sequence[range],
    token_budget: int,
) -> list[float]:
    """Exact KV-reuse sweep: a knockout whose targets start at t0 changes nothing before t0, so the clean prefix
    K/V are reused and only the suffix [t0, N) is recomputed, for G windows at once laid out as G copies of the
    suffix along the sequence (same position ids; a 4D mask lets each copy see the prefix and itself only)."""
    n = clean.embeds.shape[1]
    t0 = min(targets)
    s = n - t0
    if clean.cache.get_seq_length() < t0:
        raise MmflowError(
            f"The clean cache holds {clean.cache.get_seq_length()} positions, fewer than t0={t0}: "
            "it was cropped by an earlier sweep; pass a fresh clean_run"
        )
    _crop_to(clean.cache, t0)
    suffix = clean.embeds[:, t0:]
    g_max = len(windows) if s == 1 else max(1, min(len(windows), token_budget // s))
    probs: list[float] = []
    for start in range(0, len(windows), g_max):
        chunk = windows[start : start + g_max]
        g = len(chunk)
        q_len, kv_len = g * s, t0 + g * s
        allowed = torch.zeros(1, 1, q_len, kv_len, dtype=torch.bool, device=suffix.device)
        allowed[..., :t0] = True
        causal = torch.ones(s, s, dtype=torch.bool, device=suffix.device).tril()
        rows_of, cols_of = [], []
        for w in range(g):
            allowed[0, 0, w * s : (w + 1) * s, t0 + w * s : t0 + (w + 1) * s] = causal
            rows_of.append([w * s + (t - t0) for t in targets])
            cols_of.append([c if c < t0 else t0 + w * s + (c - t0) for c in sources])
        blocks = {
            layer: block_mask(
                [(rows_of[w], cols_of[w]) for w, layers in enumerate(chunk) if layer in layers],
                q_len,
                kv_len,
                suffix.device,
            )
            for layer in sorted({j for layers in chunk for j in layers})
        }
        mask = (
            allowed
            if base == "sdpa"
            else torch.zeros(allowed.shape, dtype=suffix.dtype, device=suffix.device).masked_fill(
                ~allowed, torch.finfo(suffix.dtype).min
            )
        )
        out = model(
            inputs_embeds=suffix.repeat(1, g, 1),
            position_ids=(t0 + torch.arange(s, device=suffix.device)).repeat(g)[None],
            attention_mask=mask,
            past_key_values=clean.cache,
            use_cache=True,
            logits_to_keep=torch.arange(g, device=suffix.device) * s + s - 1,
            knockout=Knockout(blocks),
        )
        _crop_to(clean.cache, t0)
        probs.extend(torch.softmax(out.logits[0].float(), -1)[:, clean.answer_token].tolist())
    return probs


@dataclass(frozen=True)
class Engine:
    """A knockout engine.

    ``sweep(model, encoded, clean, base, sources, targets, windows, token_budget) -> p_new per window``, where
    ``clean`` is a :func:`clean_run` (with its KV cache if ``needs_cache``), ``base`` the attention
    implementation yielded by :func:`knockout_attention`, and each window a range of layers in which the
    targets' attention to the sources is cut.
    """

    sweep: Callable[..., list[float]]
    needs_cache: bool
    description: str


#: Knockout engines by name; results agree within 1e-5 in fp32 (tested).
ENGINES: dict[str, Engine] = {
    "fast": Engine(fast_sweep, True, "exact KV reuse: only positions from the first target on are recomputed"),
    "naive": Engine(naive_sweep, False, "the paper's method: one full forward per window"),
}


def get_engine(name: str) -> Engine:
    """The engine called ``name``.

    Raises:
        MmflowError: for an unknown name, listing the known ones.
    """
    if name not in ENGINES:
        raise MmflowError(f"Unknown engine {name!r}; use one of {tuple(ENGINES)}")
    return ENGINES[name]
