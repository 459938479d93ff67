"""Tiny random Idefics3 / SmolVLM2 checkpoints: the builder lives in :mod:`mmflow.replicas.idefics3`; re-exported
here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.idefics3 import (  # noqa: F401
    LONGEST,
    PATCH,
    SCALE,
    SMOLVLM_CHAT_TEMPLATE,
    TILE,
    TOKENS_PER_TILE,
    build_tiny_idefics3,
    idefics3_tokenizer,
)
