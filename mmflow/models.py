"""Model structure, resolved in one place: loading, and where the parts of a model live (the family table is
:mod:`mmflow.families`).

Module map of the supported families (Hugging Face ``transformers`` names)::

    LlavaForConditionalGeneration                  LLaVA-1.5 (one 336 px tile, CLS dropped: 576 image tokens)
      .model.vision_tower                          CLIP vision tower
      .model.multi_modal_projector                 2-layer MLP into the language model's embedding space
      .model.language_model                        decoder-only LM (Llama, Mistral, Qwen2 backbones)
        .layers[i].self_attn                       attention of layer i, knows ``layer_idx``  <- knockout
        .rotary_emb                                rotary position embedding                  <- fast knockout
        .norm                                      final norm                                 <- logit lens
      .lm_head                                     unembedding                                <- logit lens
    LlavaNextForConditionalGeneration              LLaVA-NeXT / 1.6: same hierarchy, plus anyres tiling
      .model.pack_image_features                   unpads the tiles' features and adds newline tokens
    LlavaOnevisionForConditionalGeneration         LLaVA-OneVision: SigLIP (no CLS), Qwen2 LM, anyres_max_9 (base tile
      .model.pack_image_features                   first; large grids downsampled bilinearly), same hierarchy
    Qwen2VLForConditionalGeneration                Qwen2-VL (Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL, same map)
      .model.visual                                ViT on 14 px patches, 2x2 merge: one image token per 28 px cell
      .model.get_rope_index                        M-RoPE: (3, n) position ids (t, h, w)     <- fast knockout
      .model.language_model                        Qwen2 decoder: .layers, .rotary_emb, .norm as above
      .lm_head                                     unembedding                                <- logit lens
    Gemma3ForConditionalGeneration                 Gemma 3 (896 px squash, SigLIP 64 x 64 patches)
      .model.multi_modal_projector                 AvgPool2d(4): 16 x 16 = 256 image tokens, one per 56 px cell
      .model.language_model                        Gemma3TextModel: sliding-window and global layers, each type its
                                                   own mask (image block bidirectional) and rotary table
      .lm_head                                     tied to the embedding matrix (inputs x sqrt(hidden)) <- logit lens

Adding a family is one :class:`~mmflow.families.Family` entry plus a test that loads a tiny checkpoint of it.
"""

from __future__ import annotations

import importlib
import json
import os
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmflow.errors import MmflowError
from mmflow.families import FAMILIES, Family, build_processor, family_of, view_options  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    LlavaModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
else:
    LlavaModel = Any

REPO_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "shapes-llava"
EMBEDDED_MODEL_DIR = REPO_DIR / "shapes_world" / "shapes-llava"


def _attr(obj: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), obj)


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded model's name to its folder; other names (hub ids, folders) pass through."""
    return str(EMBEDDED_MODEL_DIR) if name_or_path == EMBEDDED_MODEL else str(name_or_path)


#: Dtypes a model can be loaded in.
DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
PROCESSOR_FILES = (
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
)


def check_dtype_device(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """The torch dtype for ``dtype``, after checking both names.

    Raises:
        MmflowError: naming ``dtype`` or ``device`` and the allowed values.
    """
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise MmflowError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise MmflowError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from err
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise MmflowError(f"{path} does not parse as JSON ({err})") from err
    if not isinstance(content, dict):
        raise MmflowError(f"{path} does not hold a JSON object")
    if "auto_map" in content:
        raise MmflowError(
            f"{path} asks for custom code (auto_map {content['auto_map']}): mmflow never runs code from "
            "a checkpoint folder; use a checkpoint in the standard transformers format"
        )
    return content


def check_safetensors(path: Path) -> None:
    """Check that a ``.safetensors`` file holds every byte its header describes.

    Raises:
        MmflowError: naming the file if it is truncated or its header is unreadable.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise MmflowError(f"Weight file {path} is truncated: {size} bytes, too short for its header")
        try:
            header = json.loads(handle.read(n))
        except ValueError as err:
            raise MmflowError(f"Weight file {path} has an unreadable header ({err})") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MmflowError(f"Weight file {path} is truncated: {size} bytes, its header describes {8 + n + end}")


def check_checkpoint_folder(folder: Path) -> bool:
    """Check a local checkpoint folder before any weight is loaded.

    Returns:
        Whether its weights are in safetensors files (then preferred).

    Raises:
        MmflowError: for a missing or unparsable config.json, custom code (``auto_map``), missing or truncated
            weights, or missing processor files, each naming the file.
    """
    if not (folder / "config.json").is_file():
        raise MmflowError(f"Model folder {folder} holds no config.json")
    _read_json(folder / "config.json")
    for alternatives in PROCESSOR_FILES:
        found = [folder / name for name in alternatives if (folder / name).is_file()]
        if not found:
            raise MmflowError(f"Model folder {folder} lacks its processor: none of {list(alternatives)} is there")
        for path in found:
            if path.suffix == ".json":
                _read_json(path)
    safetensors = sorted(folder.glob(WEIGHT_FILES[0]))
    if not safetensors and not sorted(folder.glob(WEIGHT_FILES[1])):
        raise MmflowError(f"Model folder {folder} holds no weights ({' or '.join(WEIGHT_FILES)})")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({f for f in _read_json(index).get("weight_map", {}).values() if not (folder / f).is_file()})
        if missing:
            raise MmflowError(f"{index} names weight files that are missing: {missing}")
    for path in safetensors:
        check_safetensors(path)
    return bool(safetensors)


def _locate(name_or_path: str, local_files_only: bool | None) -> tuple[str, Path, dict[str, Any]]:
    """(path, folder, from_pretrained options) of a model name; a local folder's config is checked first."""
    path = resolve_model_path(name_or_path)
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise MmflowError(f"Model folder {folder} holds no config.json")
        _read_json(folder / "config.json")  # parses, and asks for no custom code
    elif folder.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise MmflowError(f"Model folder {path} ({folder.resolve()}) not found")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return path, folder, {"local_files_only": local_files_only, "trust_remote_code": False}


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
) -> tuple[LlavaModel, Any]:
    """Load a LLaVA-family model and its processor; never runs code from the checkpoint.

    Args:
        name_or_path: ``"shapes-llava"`` (embedded), a hub id, or a local checkpoint folder.
        device: torch device to move the model to.
        dtype: one of :data:`DTYPES` (or a torch dtype), passed to ``from_pretrained``.
        local_files_only: default: True when ``HF_HUB_OFFLINE`` is set.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        MmflowError: for a bad dtype or device, a missing or broken folder (see :func:`check_checkpoint_folder`),
            a hub id that is not cached offline, custom code, or an unsupported family.

    Example:
        >>> model, processor = load_model("shapes-llava")
        >>> num_layers(model)
        8
    """
    from transformers import AutoConfig

    torch_dtype = check_dtype_device(dtype, device)
    path, folder, safe = _locate(name_or_path, local_files_only)
    try:
        config = AutoConfig.from_pretrained(path, **safe)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise MmflowError(
                f"Model '{name_or_path}' asks for custom code: mmflow never runs code from a "
                "checkpoint; use a checkpoint in the standard transformers format"
            ) from err
        raise MmflowError(
            f"Model '{name_or_path}' is not available: no local folder of that name and not in the Hugging Face "
            f"cache ({err.__class__.__name__}). Download it where there is network, e.g. "
            f"`huggingface-cli download {name_or_path}`, or pass the path of a local folder holding the "
            "checkpoint and its processor. The embedded default model is 'shapes-llava'."
        ) from err
    import transformers

    cls = getattr(transformers, family_of(config).model_class)
    use_safetensors = (check_checkpoint_folder(folder) or None) if folder.is_dir() else None
    model = cls.from_pretrained(path, dtype=torch_dtype, use_safetensors=use_safetensors, **safe)
    model.to(device).eval()
    processor = build_processor(path, config, safe)
    decoder_layers(model)  # fail early if the language model has no layer-indexed attention
    return model, processor


def load_processor(name_or_path: str, local_files_only: bool | None = None) -> tuple[Any, Any]:
    """A checkpoint's config and processor, and a weightless model skeleton (on the meta device) with its
    geometry: what ``make check-data`` needs, without loading any weight.

    Returns:
        ``(skeleton, processor)``; ``skeleton.config`` is the config.

    Raises:
        MmflowError: as :func:`load_model` does for the folder, the config and custom code.
    """
    from transformers import AutoConfig

    path, folder, safe = _locate(name_or_path, local_files_only)
    try:
        config = AutoConfig.from_pretrained(path, **safe)
        processor = build_processor(path, config, safe)
    except (OSError, ValueError) as err:
        raise MmflowError(f"Model '{name_or_path}': its config or processor cannot be read ({err})") from err
    import transformers

    with torch.device("meta"):
        skeleton = getattr(transformers, family_of(config).model_class)(config)
    return skeleton, processor


def text_model(model: LlavaModel) -> Any:
    """The decoder-only language model inside a LLaVA model."""
    return _attr(model, family_of(model).text_model)


def decoder_layers(model: LlavaModel) -> Any:
    """The language model's decoder layers.

    Raises:
        MmflowError: unless every layer's self-attention knows its layer index (needed by the knockout).
    """
    layers = getattr(text_model(model), family_of(model).layers, None)
    if layers is None or not all(hasattr(layer.self_attn, "layer_idx") for layer in layers):
        raise MmflowError(
            f"Unsupported language model {type(text_model(model)).__name__}: mmflow needs decoder layers whose "
            "self-attention has a layer_idx (Llama, Mistral, Qwen2 backbones)."
        )
    return layers


def final_norm(model: LlavaModel) -> torch.nn.Module:
    """The language model's final norm (applied before the LM head)."""
    return _attr(text_model(model), family_of(model).final_norm)


def rotary_embedding(model: LlavaModel) -> torch.nn.Module:
    """The language model's rotary position embedding (``(hidden, position_ids) -> (cos, sin)``)."""
    return _attr(text_model(model), family_of(model).rotary_embedding)


def layer_mlp(model: LlavaModel, layer: int) -> torch.nn.Module:
    """The feed-forward block of decoder layer ``layer`` (``(1, T, hidden) -> (1, T, hidden)``, row by row)."""
    return _attr(decoder_layers(model)[layer], family_of(model).mlp)


def num_layers(model: LlavaModel) -> int:
    """Number of decoder layers of the language model."""
    return len(decoder_layers(model))


def eager_attention(model: LlavaModel) -> Any:
    """The eager attention function of the model's family (what the knockout wraps under eager attention): the
    family's own, else the ``eager_attention_forward`` of the module defining the backbone's attention class.

    Raises:
        MmflowError: if that module has none.
    """
    path = family_of(model).eager_attention
    module, name = path.split(":") if path else (type(decoder_layers(model)[0].self_attn).__module__, "")
    function = getattr(importlib.import_module(module), name or "eager_attention_forward", None)
    if function is None:
        raise MmflowError(f"{module} defines no eager attention function {name or 'eager_attention_forward'!r}")
    return function


def position_ids(model: LlavaModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rotary position ids of every position of one input, shape ``(P, n)``: ``P = 1`` (position i is i) for
    1-D rotary families, ``P = 3`` (temporal, height, width) for M-RoPE families, from the model's own
    ``get_rope_index`` (image tokens share positions; text after an image advances by the image's side, not its
    token count). Passed to the rotary embedding as ``ids[:, None]`` (M-RoPE) or ``ids`` (1-D)."""
    n = int(inputs["input_ids"].shape[1])
    path = family_of(model).rope_index
    if path is None:
        return torch.arange(n, device=inputs["input_ids"].device)[None]
    names = ("input_ids", "image_grid_thw", "attention_mask", "mm_token_type_ids")
    ids, _ = _attr(model, path)(**{name: inputs.get(name) for name in names})
    return ids[:, 0]


def token_pool(model: LlavaModel) -> int:
    """The side (in ViT patches) of the square of patches averaged into one image token: the projector's pooling
    kernel for Gemma 3 (``AvgPool2d``: 64 x 64 patches -> 16 x 16 tokens, 4), 1 for families without pooling."""
    path = family_of(model).token_pool
    return int(_attr(model, path)) if path else 1


def pack_image_features(model: LlavaModel) -> Any:
    """The family's anyres feature packing function, or None for single-tile families."""
    path = family_of(model).pack_image_features
    return _attr(model, path) if path else None
