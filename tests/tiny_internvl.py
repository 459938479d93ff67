"""Tiny random InternVL checkpoints (Qwen2, Llama or Qwen3 backbone): the builder lives in
:mod:`mmflow.replicas.internvl` (so that ``make families`` can use it without pytest); re-exported here under the
names the tests use."""

from __future__ import annotations

from mmflow.replicas.internvl import (  # noqa: F401
    BACKBONES,
    IMAGE_TOKENS,
    INTERNVL_CHAT_TEMPLATE,
    MAX_PATCHES,
    PATCH,
    SPECIAL,
    SYSTEM,
    TILE,
    TOKENS_PER_TILE,
    build_tiny_internvl,
    internvl_tokenizer,
)
