"""How many suffix tokens the fast engine puts in one pass: from the device's free memory, or as the user sets it."""

from __future__ import annotations

import os

import torch

from mmflow.cache import env_token_budget
from mmflow.errors import MmflowError
from mmflow.models import LlavaModel


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
