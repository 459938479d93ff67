"""Shared fixtures: tiny random checkpoints of both model classes, saved once per session, no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

tiny.offline_env()
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny checkpoints: llava (crop), llava_pad (pad-to-square), llava_next (anyres), *_sp (real
    SentencePiece tokenizer), llava_next_gqa (grouped-query attention backbone, as Mistral / Llama-3)."""
    root = tmp_path_factory.mktemp("tiny")
    sp = tiny.sentencepiece_tokenizer(root / "sp_tok")
    return {
        "llava": tiny.build_tiny(root / "llava", "llava"),
        "llava_pad": tiny.build_tiny(root / "llava_pad", "llava", pad=True),
        "llava_next": tiny.build_tiny(root / "llava_next", "llava_next"),
        "llava_sp": tiny.build_tiny(root / "llava_sp", "llava", tokenizer=sp),
        "llava_next_sp": tiny.build_tiny(root / "llava_next_sp", "llava_next", tokenizer=sp),
        "llava_next_gqa": tiny.build_tiny(root / "llava_next_gqa", "llava_next", num_key_value_heads=2),
    }


@pytest.fixture(scope="session")
def loaded(tiny_dirs):
    """Cache of (model, processor) pairs loaded through mmflow_utils.load_model."""
    import mmflow_utils as mu

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = mu.load_model(str(tiny_dirs[name]))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def replica_dir(tmp_path_factory):
    """``replica_dir(family)``: the folder of the family's tiny replica (its :data:`mmflow.replicas.REPLICAS` row),
    built on first use, once per session."""
    from mmflow.replicas import build, replica

    root = tmp_path_factory.mktemp("replicas")
    folders: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in folders:
            folders[family] = build(replica(family), root / family)
        return folders[family]

    return get


@pytest.fixture(scope="session")
def replica_model(replica_dir):
    """``replica_model(family)``: (model, processor) of the family's replica, loaded once per session through
    mmflow_utils.load_model."""
    import mmflow_utils as mu

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = mu.load_model(str(replica_dir(family)))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def replica_notebooks(replica_dir, tmp_path_factory):
    """Every notebook on every replica, started on first use in a background kernel (tests/shared_kernel.py);
    ``.wait(family)`` returns once the family's have run, ``.jobs[family]`` says what ran where."""
    from shared_kernel import Background
    from test_replica_notebooks import notebook_jobs

    background = Background(notebook_jobs(replica_dir, tmp_path_factory))
    yield background
    background.close()
