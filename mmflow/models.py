"""Model structure, resolved in one place: the family table, loading, and where the parts of a model live.

Module map of the supported families (Hugging Face ``transformers`` names)::

    LlavaForConditionalGeneration                  LLaVA-1.5 (one 336 px tile, CLS dropped: 576 image tokens)
      .model.vision_tower                          CLIP vision tower
      .model.multi_modal_projector                 2-layer MLP into the language model's embedding space
      .model.language_model                        decoder-only LM (Llama, Mistral, Qwen2 backbones)
        .layers[i].self_attn                       attention of layer i, knows ``layer_idx``  <- knockout
        .norm                                      final norm                                 <- logit lens
      .lm_head                                     unembedding                                <- logit lens
    LlavaNextForConditionalGeneration              LLaVA-NeXT / 1.6: same hierarchy, plus anyres tiling
      .model.pack_image_features                   unpads the tiles' features and adds newline tokens

Adding a family is one :class:`Family` entry in :data:`FAMILIES` plus a test that loads a tiny checkpoint of it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmflow.errors import MmflowError

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    LlavaModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
else:
    LlavaModel = Any

REPO_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "shapes-llava"
EMBEDDED_MODEL_DIR = REPO_DIR / "shapes_world" / "shapes-llava"


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the parts mmflow needs (attribute paths from the top-level model)."""

    name: str
    config_class: str  #: transformers config class that identifies the family (structure, never the name)
    model_class: str  #: its conditional-generation class
    text_model: str = "model.language_model"  #: the decoder-only language model
    layers: str = "layers"  #: decoder layers, relative to the text model
    final_norm: str = "norm"  #: final norm, relative to the text model
    #: attention function the knockout wraps when the model runs with eager attention ("module:function")
    eager_attention: str = "transformers.models.llama.modeling_llama:eager_attention_forward"
    #: anyres feature packing (unpadding + newline tokens), None for single-tile families
    pack_image_features: str | None = None


#: The supported families, most specific first.
FAMILIES = (
    Family(
        "llava-next",
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        pack_image_features="model.pack_image_features",
    ),
    Family("llava", "LlavaConfig", "LlavaForConditionalGeneration"),
)


def _attr(obj: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), obj)


def family_of(config: Any) -> Family:
    """The :class:`Family` of a config (or of a model's config), chosen by its class, not its name.

    Raises:
        MmflowError: for a config of no supported family.
    """
    import transformers

    config = getattr(config, "config", config)
    for family in FAMILIES:
        if isinstance(config, getattr(transformers, family.config_class)):
            return family
    raise MmflowError(
        f"Unsupported model class: config {type(config).__name__} "
        f"(architectures={getattr(config, 'architectures', None)}). "
        f"mmflow supports {', '.join(f.model_class for f in FAMILIES)} checkpoints in the Hugging Face format, "
        "e.g. llava-hf/llava-1.5-7b-hf or llava-hf/llava-v1.6-vicuna-7b-hf."
    )


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded model's name to its folder; other names (hub ids, folders) pass through."""
    return str(EMBEDDED_MODEL_DIR) if name_or_path == EMBEDDED_MODEL else str(name_or_path)


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
) -> tuple[LlavaModel, Any]:
    """Load a LLaVA-family model and its processor.

    Args:
        name_or_path: ``"shapes-llava"`` (embedded), a hub id, or a local checkpoint folder.
        device: torch device to move the model to.
        dtype: torch dtype (name or object) passed to ``from_pretrained``.
        local_files_only: default: True when ``HF_HUB_OFFLINE`` is set.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        MmflowError: for a missing folder, a hub id that is not cached offline, or an unsupported family.

    Example:
        >>> model, processor = load_model("shapes-llava")
        >>> num_layers(model)
        8
    """
    from transformers import AutoConfig, AutoProcessor

    path = resolve_model_path(name_or_path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        if Path(path).expanduser().is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
            raise MmflowError(f"Model folder {path} not found (or it holds no config.json)") from err
        raise MmflowError(
            f"Model '{name_or_path}' is not available: no local folder of that name and not in the Hugging Face "
            f"cache ({err.__class__.__name__}). Download it where there is network, e.g. "
            f"`huggingface-cli download {name_or_path}`, or pass the path of a local folder holding the "
            "checkpoint and its processor. The embedded default model is 'shapes-llava'."
        ) from err
    import transformers

    cls = getattr(transformers, family_of(config).model_class)
    model = cls.from_pretrained(path, dtype=torch_dtype, local_files_only=local_files_only)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
    decoder_layers(model)  # fail early if the language model has no layer-indexed attention
    return model, processor


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


def num_layers(model: LlavaModel) -> int:
    """Number of decoder layers of the language model."""
    return len(decoder_layers(model))


def eager_attention(model: LlavaModel) -> Any:
    """The eager attention function of the model's family (what the knockout wraps under eager attention)."""
    module, name = family_of(model).eager_attention.split(":")
    return getattr(importlib.import_module(module), name)


def pack_image_features(model: LlavaModel) -> Any:
    """The family's anyres feature packing function, or None for single-tile families."""
    path = family_of(model).pack_image_features
    return _attr(model, path) if path else None
