"""Tiny random Pixtral-12B and Mistral3 (Mistral-Small-3.1) checkpoints: the builder lives in
:mod:`mmflow.replicas.pixtral`; re-exported here under the names the tests use."""

from __future__ import annotations

from mmflow.replicas.pixtral import (  # noqa: F401
    GEOMETRY,
    MISTRAL3_CHAT_TEMPLATE,
    MISTRAL3_SYSTEM,
    PIXTRAL_CHAT_TEMPLATE,
    SPECIAL,
    build_tiny_pixtral,
    mistral_tokenizer,
)
