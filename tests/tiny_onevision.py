"""A tiny random LLaVA-OneVision checkpoint: the builder lives in :mod:`mmflow.replicas.onevision`; re-exported
here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.onevision import (  # noqa: F401
    ONEVISION_CHAT_TEMPLATE,
    PATCH,
    PINPOINTS,
    SPECIAL,
    TILE,
    build_tiny_onevision,
    onevision_tokenizer,
)
