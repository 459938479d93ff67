"""Tiny random LLaVA / LLaVA-NeXT checkpoints: the builders live in :mod:`mmflow.replicas.llava` (so that
``make families`` can use them without pytest); re-exported here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.llava import (  # noqa: F401
    CORPUS,
    GRID_PINPOINTS,
    IMAGE,
    PATCH,
    _text_config,
    _vision_config,
    build_tiny,
    byte_level_tokenizer,
    offline_env,
    sentencepiece_tokenizer,
)
