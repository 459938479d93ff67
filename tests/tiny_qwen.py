"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints: the builders live in :mod:`mmflow.replicas.qwen`; re-exported
here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.qwen import (  # noqa: F401
    MAX_PIXELS,
    MERGE,
    MIN_PIXELS,
    PATCH,
    QWEN_VL_CHAT_TEMPLATE,
    SPECIAL,
    build_tiny_qwen,
    qwen_tokenizer,
)
