"""Checkpoint folders checked before any weight is loaded, and where a model name's files are on this machine.

A model name is an embedded model (``"shapes-llava"``, ``"shapes-qwen"``), a local folder, or a hub id. A hub id is
looked up in the local Hugging Face cache first (no network); its snapshot folder is then loaded like a local folder.
Every JSON file transformers reads is parsed and refused if it asks for custom code (``auto_map`` at any depth),
every safetensors header is checked against its file, and the config's ``model_type`` must be one transformers knows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmflow.errors import MmflowError

REPO_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "shapes-llava"  #: the default model
EMBEDDED_MODEL_DIR = REPO_DIR / "shapes_world" / "shapes-llava"
#: The embedded models, trained on the shapes world (``make toy-model MODEL=...``), by name: a LLaVA-1.5 and a
#: Qwen2-VL (:mod:`shapes_world.archs`).
EMBEDDED_MODELS = {name: REPO_DIR / "shapes_world" / name for name in ("shapes-llava", "shapes-qwen")}
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
PROCESSOR_FILES = (
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
)
#: JSON files transformers reads from a checkpoint folder (each must parse as an object)
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "model.safetensors.index.json",
)
SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"}
SAFETENSORS_DTYPES |= {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
DOWNLOAD_HINT = (
    "Download it where there is network, e.g. `huggingface-cli download {name}` (then copy the Hugging Face cache "
    "or set HF_HUB_CACHE), or pass the path of a local folder holding the checkpoint and its processor. "
    "The embedded models 'shapes-llava' and 'shapes-qwen' need no download."
)


@dataclass(frozen=True)
class Located:
    """Where a model name's files are: what ``from_pretrained`` gets, the local folder (None for a hub id that is
    not cached), and the hub revision (commit hash) of a cached snapshot."""

    path: str
    folder: Path | None
    revision: str | None = None


def find_auto_map(content: Any, where: str = "") -> str | None:
    """The key path of the first ``auto_map`` at any depth of parsed JSON, or None.

    Example:
        >>> find_auto_map({"image_processor": {"auto_map": {"AutoImageProcessor": "x.Y"}}})
        'image_processor.auto_map'
    """
    if isinstance(content, dict):
        for key, value in content.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "auto_map":
                return here
            found = find_auto_map(value, here)
            if found:
                return found
    elif isinstance(content, list):
        for i, value in enumerate(content):
            found = find_auto_map(value, f"{where}[{i}]")
            if found:
                return found
    return None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, parsed.

    Raises:
        MmflowError: naming the file if it does not parse, holds no object, or asks for custom code (``auto_map``
            anywhere in it).
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise MmflowError(f"{path} does not parse as JSON ({err})") from None
    if not isinstance(content, dict):
        raise MmflowError(f"{path} does not hold a JSON object")
    where = find_auto_map(content)
    if where:
        raise MmflowError(
            f"{path} asks for custom code ({where}): mmflow never runs code from a checkpoint folder; "
            "use a checkpoint in the standard transformers format"
        )
    return content


def check_model_type(folder: Path) -> dict:
    """The folder's config.json, after checking that transformers knows its ``model_type`` (and its sub-configs').

    Raises:
        MmflowError: naming the value and the file.
    """
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / "config.json"
    config = read_json(path)
    if "model_type" not in config:
        raise MmflowError(f'{path} has no model_type (e.g. "llava" or "llava_next")')
    for key, sub in [("model_type", config), *((f"{k}.model_type", v) for k, v in config.items())]:
        value = sub.get("model_type") if isinstance(sub, dict) else None
        if value is not None and (not isinstance(value, str) or value not in CONFIG_MAPPING):
            raise MmflowError(
                f"{path}: {key} {value!r} is not a model type transformers {__version__} knows "
                '(mmflow supports "llava" and "llava_next" checkpoints)'
            )
    return config


def _header_error(path: Path, what: str) -> MmflowError:
    return MmflowError(f"Weight file {path} has a malformed header: {what}")


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """The (begin, end) byte offsets of one tensor entry of a safetensors header, after checking it."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _header_error(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise _header_error(path, f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _header_error(path, f"tensor {name!r} has a shape that is not a list of sizes: {shape!r}")
    ok = isinstance(offsets, list) and len(offsets) == 2
    if not ok or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or offsets[0] > offsets[1]:
        raise _header_error(path, f"tensor {name!r} has data_offsets that are not [begin, end]: {offsets!r}")
    if offsets[1] > data_size:
        raise MmflowError(
            f"Weight file {path} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, "
            f"which holds {data_size}"
        )
    return offsets[0], offsets[1]


def check_safetensors(path: Path) -> None:
    """Check that a ``.safetensors`` file's header is well formed and describes exactly the bytes the file holds.

    Raises:
        MmflowError: naming the file if it is truncated or its header is unreadable, not an object, has an entry
            without dtype, shape or data_offsets, values of the wrong type, or offsets out of order or overlapping.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise MmflowError(f"Weight file {path} is truncated: {size} bytes, too short for its header")
        try:
            header = json.loads(handle.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise _header_error(path, f"not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _header_error(path, "not a JSON object")
    spans = sorted(_check_entry(path, k, v, size - 8 - n) + (k,) for k, v in header.items() if k != "__metadata__")
    position = 0
    for begin, end, name in spans:
        if begin != position:
            gap = "overlaps the tensor before it" if begin < position else f"leaves bytes {position}-{begin} unused"
            raise _header_error(path, f"tensor {name!r} at data offsets [{begin}, {end}] {gap}")
        position = end
    if position != size - 8 - n:
        raise _header_error(path, f"its tensors end at byte {position} of the data, but {size - 8 - n} bytes follow it")


def check_configs(folder: Path) -> None:
    """Check the JSON files of a checkpoint folder (see :data:`CONFIG_FILES`) and its config's model_type.

    Raises:
        MmflowError: for a missing or unparsable config.json, an unknown model_type, or custom code (``auto_map``
            in any of them), naming the file.
    """
    if not (folder / "config.json").is_file():
        raise MmflowError(f"Model folder {folder} holds no config.json")
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            read_json(folder / name)
    check_model_type(folder)


def check_checkpoint_folder(folder: Path) -> bool:
    """Check a local checkpoint folder before any weight is loaded.

    Returns:
        Whether its weights are in safetensors files (then preferred).

    Raises:
        MmflowError: for a missing or unparsable config.json, an unknown model_type, custom code (``auto_map`` in
            any JSON file transformers reads), missing or malformed weights, or missing processor files, each naming
            the file.
    """
    check_configs(folder)
    for alternatives in PROCESSOR_FILES:
        if not any((folder / name).is_file() for name in alternatives):
            raise MmflowError(f"Model folder {folder} lacks its processor: none of {list(alternatives)} is there")
    safetensors = sorted(folder.glob(WEIGHT_FILES[0]))
    if not safetensors and not sorted(folder.glob(WEIGHT_FILES[1])):
        raise MmflowError(f"Model folder {folder} holds no weights ({' or '.join(WEIGHT_FILES)})")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({f for f in read_json(index).get("weight_map", {}).values() if not (folder / f).is_file()})
        if missing:
            raise MmflowError(f"{index} names weight files that are missing: {missing}")
    for path in safetensors:
        check_safetensors(path)
    return bool(safetensors)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, read now, or huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> tuple[Path, str] | None:
    """(snapshot folder, revision) of a hub id's ``main`` in the local hub cache, or None; never uses the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    return snapshot, snapshot.name


def offline(local_files_only: bool | None) -> bool:
    """Whether the hub must not be contacted: ``local_files_only``, or by default ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``."""
    if local_files_only is not None:
        return local_files_only
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_reachable(repo_id: str, name: str) -> None:
    """Raise at once unless the hub answers for ``repo_id`` within 1.5 s (one request, no retries)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=1.5)
    except RepositoryNotFoundError:
        raise MmflowError(
            f"Model '{name}': no local folder of that name, and the hub has no such model (or it is private: log "
            "in with `huggingface-cli login`). The embedded models 'shapes-llava' and 'shapes-qwen' need no download."
        ) from None
    except Exception as err:  # noqa: BLE001 (any failure to get an answer: the network library's own errors)
        raise MmflowError(
            f"Model '{name}' is not in the local Hugging Face cache ({hub_cache_dir()}) and the hub cannot be "
            f"reached ({err.__class__.__name__}). " + DOWNLOAD_HINT.format(name=name)
        ) from None


def local_folder(name_or_path: str) -> Path | None:
    """The folder a model name means (the embedded model's, or a local folder with a config.json), or None for a
    hub id; nothing is read but the file system, no hub is asked.

    Raises:
        MmflowError: for a folder-like name that is missing, a file, or holds no config.json, and for a name that
            is neither a folder here nor a well-formed hub id (``owner/name``).
    """
    path = str(EMBEDDED_MODELS.get(name_or_path, name_or_path))
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise MmflowError(f"Model folder {folder} holds no config.json")
        return folder
    if folder.exists():
        raise MmflowError(f"Model folder {path} ({folder.resolve()}) is a file, not a folder")
    if folder.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise MmflowError(f"Model folder {path} ({folder.resolve()}) not found")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as err:
        raise MmflowError(f"Model {path!r} is neither a folder here nor a hub id ({err})") from None
    return None


def locate(name_or_path: str, local_files_only: bool | None = None) -> Located:
    """Where a model name's files are: the embedded model's folder, a local folder, or a hub id's cached snapshot
    (then loaded as a folder); a hub id that is not cached is downloaded only if the hub answers at once.

    Raises:
        MmflowError: for a folder that does not exist or holds no config.json, or a hub id that is not cached while
            the hub is offline or unreachable (naming the download command), in well under 2 s.
    """
    folder = local_folder(name_or_path)
    if folder is not None:
        return Located(str(folder), folder)
    path = name_or_path
    snapshot = cached_snapshot(path)
    if snapshot is not None:
        return Located(str(snapshot[0]), snapshot[0], snapshot[1])
    if offline(local_files_only):
        raise MmflowError(
            f"Model '{name_or_path}' is not available offline: no local folder of that name and not in the "
            f"Hugging Face cache ({hub_cache_dir()}). " + DOWNLOAD_HINT.format(name=name_or_path)
        )
    _hub_reachable(path, name_or_path)
    return Located(path, None)
