"""Tiny random replicas of every supported model family, built from config and saved like hub folders (weights,
config, processor files), for the tests and ``make families`` (:mod:`mmflow.families_check`). No network.

:data:`REPLICAS` is the one table: per family, its builder, the picture it is checked on, the family's patch
geometry written out independently (:mod:`mmflow.replicas.geometry`), the paper inputs and real checkpoints to try.
A builder or geometry is named ``"module:function"`` (an importable module) or ``"path/to/file.py:function"``
(a file relative to the repository root, e.g. a test helper; its folder is put on ``sys.path`` to import it), so a
family's builder may live wherever it is written.

Registering a family: one :class:`Replica` row in :data:`REPLICAS` whose ``family`` is the
:attr:`mmflow.families.Family.name`; the builder is called as ``builder(folder, **kwargs)`` and returns the folder;
the geometry as ``geometry(size, box)`` and returns a label per image token: "R", "O", "N" or "?" (see
:mod:`mmflow.replicas.geometry`), or mmflow's RELATED / OTHER / NEITHER values (a list or a tensor), so a test's
own arithmetic such as ``"tests/test_families_check.py:qwen_labels"`` can serve.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmflow.errors import MmflowError

ROOT = Path(__file__).resolve().parents[2]  #: the repository root (relative builder paths start here)


@dataclass(frozen=True)
class Replica:
    """How one family's tiny replica is built and checked."""

    family: str  #: the :attr:`mmflow.families.Family.name` it must load as
    builder: str  #: ``"module:function"`` or ``"file.py:function"``: ``builder(folder, **kwargs) -> folder``
    geometry: str  #: ``"module:function"`` or ``"file.py:function"``: ``geometry(size, box) -> [label per token]``
    paper_inputs: str  #: what ``inputs="paper"`` builds (prompt, image preprocessing), in a few words
    hub_ids: tuple[str, ...]  #: real checkpoints of the family to try
    kwargs: dict[str, Any] = field(default_factory=dict)  #: the builder's keyword arguments
    size: tuple[int, int] = (150, 100)  #: the picture the check encodes (width, height)
    box: tuple[float, float, float, float] = (90, 8, 40, 30)  #: its related box (x, y, w, h)
    inputs: str = "paper"  #: the inputs it is encoded with ("processor" where the paper defines none)
    #: the image's tokens attend to each other both ways (Gemma 3): the oracle's mask holds each image's block
    bidirectional_image: bool = False


_GEOMETRY = "mmflow.replicas.geometry"
#: The replicas, one per family, in the order of the README table.
REPLICAS = (
    Replica(
        "llava",
        "mmflow.replicas.llava:build_tiny",
        f"{_GEOMETRY}:llava_paper",
        "vicuna_v1 prompt, padded to a square",
        ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
        {"kind": "llava", "layers": 4},
        size=(90, 60),
        box=(10, 10, 20, 15),
    ),
    Replica(
        "llava-next",
        "mmflow.replicas.llava:build_tiny",
        f"{_GEOMETRY}:llava_next",
        "vicuna_v1 or Llama-3 prompt, anyres tiles",
        ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llama3-llava-next-8b-hf"),
        {"kind": "llava_next", "layers": 4},
        size=(90, 60),
        box=(10, 10, 20, 15),
    ),
    Replica(
        "llava-onevision",
        "mmflow.replicas.onevision:build_tiny_onevision",
        f"{_GEOMETRY}:onevision_paper",
        "qwen_1_5 prompt, anyres_max_9 tiles",
        ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        {"layers": 4},
        size=(100, 60),
        box=(10, 10, 30, 20),
    ),
    Replica(
        "qwen2-vl",
        "mmflow.replicas.qwen:build_tiny_qwen",
        f"{_GEOMETRY}:qwen_vl",
        "ChatML with system prompt, smart_resize",
        ("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"),
        {"kind": "qwen2_vl", "layers": 4},
    ),
    Replica(
        "qwen2.5-vl",
        "mmflow.replicas.qwen:build_tiny_qwen",
        f"{_GEOMETRY}:qwen_vl",
        "ChatML with system prompt, smart_resize",
        ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),
        {"kind": "qwen2_5_vl", "layers": 4},
    ),
    Replica(
        "qwen3-vl",
        "mmflow.replicas.qwen3:build_tiny_qwen3",
        f"{_GEOMETRY}:qwen3_vl",
        "ChatML without system prompt, smart_resize",
        ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct"),
        {"kind": "qwen3_vl", "layers": 4},
    ),
    Replica(
        "qwen3-vl-moe",
        "mmflow.replicas.qwen3:build_tiny_qwen3",
        f"{_GEOMETRY}:qwen3_vl",
        "ChatML without system prompt, smart_resize",
        ("Qwen/Qwen3-VL-30B-A3B-Instruct",),
        {"kind": "qwen3_vl_moe", "layers": 4},
    ),
    Replica(
        "internvl",
        "mmflow.replicas.internvl:build_tiny_internvl",
        f"{_GEOMETRY}:internvl",
        "internvl2_5 prompt with its system message, dynamic tiles + thumbnail",
        ("OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-1B-hf"),
        {"backbone": "qwen2", "layers": 4},
    ),
    Replica(
        "pixtral",
        "mmflow.replicas.pixtral:build_tiny_pixtral",
        f"{_GEOMETRY}:pixtral_native",
        "Mistral [INST] prompt, native resolution",
        ("mistral-community/pixtral-12b",),
        {"kind": "pixtral", "layers": 4},
    ),
    Replica(
        "mistral3",
        "mmflow.replicas.pixtral:build_tiny_pixtral",
        f"{_GEOMETRY}:mistral3_native",
        "Mistral [INST] prompt, native resolution",
        ("mistralai/Mistral-Small-3.1-24B-Instruct-2503",),
        {"kind": "mistral3", "layers": 4},
    ),
    Replica(
        "gemma3",
        "mmflow.replicas.gemma3:build_tiny_gemma3",
        f"{_GEOMETRY}:gemma3_squash",
        "Gemma 3 chat turn, squashed to a square",
        ("google/gemma-3-4b-it", "google/gemma-3-12b-it"),
        {"layers": 4},
        bidirectional_image=True,
    ),
    Replica(
        "idefics3",
        "mmflow.replicas.idefics3:build_tiny_idefics3",
        f"{_GEOMETRY}:idefics3",
        "User: chat turn, image first, tiles + global image",
        ("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceM4/Idefics3-8B-Llama3"),
        {"kind": "idefics3", "layers": 4},
    ),
    Replica(
        "smolvlm",
        "mmflow.replicas.idefics3:build_tiny_idefics3",
        f"{_GEOMETRY}:idefics3",
        "User: chat turn, image first, tiles + global image",
        ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
        {"kind": "smolvlm", "layers": 4},
    ),
)


def resolve(spec: str) -> Callable:
    """The function a ``"module:function"`` or ``"path/to/file.py:function"`` spec names.

    Raises:
        MmflowError: naming the spec, for a malformed spec, a missing file or module, or a missing function.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise MmflowError(f"Replica spec {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = ROOT / target
        if not path.is_file():
            raise MmflowError(f"Replica spec {spec!r}: no file {path}")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        target = path.stem
    try:
        module = importlib.import_module(target)
    except ImportError as err:
        raise MmflowError(f"Replica spec {spec!r}: cannot import {target!r} ({err})") from err
    if not callable(getattr(module, name, None)):
        raise MmflowError(f"Replica spec {spec!r}: {target} has no function {name!r}")
    return getattr(module, name)


def replica(family: str) -> Replica:
    """The :class:`Replica` of ``family`` (a :attr:`~mmflow.families.Family.name`).

    Raises:
        MmflowError: for a family without a replica, listing those with one.
    """
    for row in REPLICAS:
        if row.family == family:
            return row
    raise MmflowError(f"No replica of family {family!r}; replicas: {', '.join(r.family for r in REPLICAS)}")


def build(row: Replica, folder: Path) -> Path:
    """Build ``row``'s replica into ``folder`` (created) and return the folder."""
    return Path(resolve(row.builder)(Path(folder), **row.kwargs))
