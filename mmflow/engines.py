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
from mmflow.fast import Clean, fast_sweep, wide
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
    def attention(module, query, key, value, attention_mask, knockout: Knockout | None = None, copies=None, **kwargs):
        if copies is not None:  # the fast engine's suffix copies (mmflow.fast.SuffixCopies) compute this layer
            return copies(module, query, key, value, kwargs.get("scaling") or module.scaling)
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


def naive_sweep(
    model: LlavaModel,
    encoded: Encoded,
    clean: Clean,
    base: str,
    flows: Sequence[tuple[list[int], list[int]]],
    windows: Sequence[range],
    token_budget: int | None,
) -> list[list[float]]:
    """The paper's method: one full forward (vision tower included) per flow and window."""
    n = encoded.length
    probs = []
    for sources, targets in flows:
        block = block_mask([(targets, sources)], n, n, model.device)
        probs.append([])
        for layers in windows:
            knockout = Knockout({j: block for j in layers})
            out = model(**encoded.inputs, use_cache=False, logits_to_keep=1, knockout=knockout)
            probs[-1].append(float(torch.softmax(wide(out.logits[0, -1]), -1)[clean.answer_token]))
    return probs


@dataclass(frozen=True)
class Engine:
    """A knockout engine.

    ``sweep(model, encoded, clean, base, flows, windows, token_budget) -> p_new[flow][window]``, where
    ``clean`` is a :func:`~mmflow.fast.clean_run` (with its KV cache if ``needs_cache``), ``base`` the attention
    implementation yielded by :func:`knockout_attention`, ``flows`` a list of ``(sources, targets)`` positions
    and each window a range of layers in which the targets' attention to the sources is cut.
    """

    sweep: Callable[..., list[list[float]]]
    needs_cache: bool
    description: str


#: Knockout engines by name; results agree within 1e-5 in fp32 (tested).
ENGINES: dict[str, Engine] = {
    "fast": Engine(
        fast_sweep,
        True,
        "exact reuse of the clean run: only the positions from the first target on and the layers from the window "
        "on are recomputed",
    ),
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
