"""Tiny random Qwen3-VL / Qwen3-VL-MoE checkpoints: the builder lives in :mod:`mmflow.replicas.qwen3`; re-exported
here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.qwen3 import (  # noqa: F401
    DEEPSTACK,
    KINDS,
    MAX_PIXELS,
    MERGE,
    MIN_PIXELS,
    PATCH,
    QWEN3_VL_CHAT_TEMPLATE,
    build_tiny_qwen3,
)
