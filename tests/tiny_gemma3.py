"""Tiny random Gemma 3 checkpoints: the builder lives in :mod:`mmflow.replicas.gemma3`; re-exported here under the
names the tests use."""

from __future__ import annotations

from mmflow.replicas.gemma3 import (  # noqa: F401
    GEMMA3_CHAT_TEMPLATE,
    IMAGE,
    LAYER_TYPES,
    TOKENS,
    WINDOW,
    build_tiny_gemma3,
)
