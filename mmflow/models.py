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
    InternVLForConditionalGeneration               InternVL 2.5 / 3 (-hf): Qwen2, Llama or Qwen3 language model
      .model.vision_tower                          InternViT on 448 px tiles (dynamic crops + thumbnail), CLS dropped
      .model.pixel_shuffle                         2 x 2 patches -> one token: 256 tokens per tile <- patch groups
      .model.language_model                        the backbone: .layers, .rotary_emb, .norm as above
    Qwen3VLForConditionalGeneration                Qwen3-VL (Qwen3VLMoeForConditionalGeneration: its MoE twin, same map)
      .model.visual                                ViT on 16 px patches, 2x2 merge: one image token per 32 px cell;
                                                   DeepStack: features of vision layers deepstack_visual_indexes
                                                   are added to the outputs of the first decoder layers at the
                                                   image positions                           <- fast knockout refuses
      .model.get_rope_index                        interleaved M-RoPE: (3, n) position ids (t, h, w)
      .model.language_model                        Qwen3 decoder (Q/K norm): .layers, .rotary_emb, .norm
    LlavaForConditionalGeneration (Pixtral-12B)    a LlavaConfig whose vision_config.model_type is "pixtral"
      .model.vision_tower                          Pixtral ViT, 16 px patches, 2-D RoPE, native aspect ratio
      .model.language_model                        Mistral decoder: .layers, .rotary_emb, .norm as above
    Mistral3ForConditionalGeneration               Mistral-Small-3.1: Pixtral ViT on 14 px patches, then
      .model.multi_modal_projector.patch_merger    a 2x2 merge: one image token per 28 px cell; Mistral decoder
    Gemma3ForConditionalGeneration                 Gemma 3 (896 px squash, SigLIP 64 x 64 patches)
      .model.multi_modal_projector                 AvgPool2d(4): 16 x 16 = 256 image tokens, one per 56 px cell
      .model.language_model                        Gemma3TextModel: sliding-window and global layers, each type its
                                                   own mask (image block bidirectional) and rotary table
      .lm_head                                     tied to the embedding matrix (inputs x sqrt(hidden)) <- logit lens
    Idefics3ForConditionalGeneration               Idefics3, SmolVLM v1 (SmolVLMForConditionalGeneration: SmolVLM2,
                                                   same map): image split into rows x cols tiles + a global
      .model.vision_model                          image; SigLIP-style tower per tile
      .model.connector.pixel_shuffle               scale x scale patches into one token      <- patch geometry
      .model.text_model                            Llama decoder (not .language_model): .layers, .rotary_emb, .norm
      .lm_head                                     unembedding                                <- logit lens

Adding a family is one :class:`~mmflow.families.Family` entry plus a test that loads a tiny checkpoint of it.
"""

from __future__ import annotations

import importlib
from functools import reduce
from typing import TYPE_CHECKING, Any

import torch

from mmflow.checkpoints import (  # noqa: F401 (re-exported)
    EMBEDDED_MODEL,
    EMBEDDED_MODEL_DIR,
    EMBEDDED_MODELS,
    REPO_DIR,
    check_checkpoint_folder,
    check_configs,
    check_safetensors,
    locate,
)
from mmflow.errors import MmflowError
from mmflow.families import (  # noqa: F401 (re-exported)
    FAMILIES,
    Family,
    build_processor,
    check_fast_engine,
    family_of,
    view_options,
)
from mmflow.params import DTYPES, check_device, check_dtype  # noqa: F401 (DTYPES re-exported)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    LlavaModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
else:
    LlavaModel = Any


def _attr(obj: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), obj)


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model's name to its folder; other names (hub ids, folders) pass through."""
    return str(EMBEDDED_MODELS.get(name_or_path, name_or_path))


def check_dtype_device(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """The torch dtype for ``dtype``, after checking both (:func:`~mmflow.params.check_dtype`,
    :func:`~mmflow.params.check_device`).

    Raises:
        MmflowError: naming ``dtype`` or ``device`` and the allowed values.
    """
    if not isinstance(dtype, torch.dtype):
        check_dtype(dtype)
    check_device(device)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_loaded(model: Any, info: dict[str, Any], where: str) -> None:
    """Raise unless every tensor of the model came from the checkpoint, with its shape, and nothing was left over
    (tied weights and non-persistent buffers are not reported by transformers).

    Raises:
        MmflowError: naming the folder and the first offending tensor.
    """
    problems = [
        (
            sorted(info["missing_keys"]),
            "lacks tensor {}, which {} needs (an incomplete checkpoint, or a config "
            "whose model_type does not match its weights)",
        ),
        (
            sorted(info["unexpected_keys"]),
            "holds tensor {}, which {} does not have (a config whose model_type does not match its weights?)",
        ),
        (
            sorted(f"{k} (checkpoint shape {list(a)}, model shape {list(b)})" for k, a, b in info["mismatched_keys"]),
            "holds tensor {} of the wrong shape for {}",
        ),
    ]
    for keys, message in problems:
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise MmflowError(f"Checkpoint {where} " + message.format(keys[0] + more, type(model).__name__))


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
) -> tuple[LlavaModel, Any]:
    """Load a LLaVA-family model and its processor; never runs code from the checkpoint.

    Args:
        name_or_path: ``"shapes-llava"`` or ``"shapes-qwen"`` (embedded), a hub id, or a local checkpoint folder.
        device: torch device to move the model to.
        dtype: one of :data:`DTYPES` (or a torch dtype), passed to ``from_pretrained``.
        local_files_only: default: True when ``HF_HUB_OFFLINE`` is set. A hub id found in the local Hugging Face
            cache is always loaded from its snapshot folder, without the network.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        MmflowError: for a bad dtype or device, a missing or broken folder (see :func:`check_checkpoint_folder`),
            a hub id that is not cached while offline or the hub is unreachable, custom code, an unsupported family,
            or weights that do not match the model (a missing, unexpected or wrongly shaped tensor), naming the
            folder and the first offending tensor.

    Example:
        >>> model, processor = load_model("shapes-llava")
        >>> num_layers(model)
        8
    """
    import transformers

    torch_dtype = check_dtype_device(dtype, device)
    located = locate(name_or_path, local_files_only)
    if located.folder:
        check_configs(located.folder)
    where = located.folder or name_or_path
    config = _config(located, where)
    cls = getattr(transformers, family_of(config).model_class)
    use_safetensors = (check_checkpoint_folder(located.folder) or None) if located.folder else None
    from mmflow.cache import interactive_frontend

    if not interactive_frontend():  # a headless run keeps no stuck "Loading weights: 0%" bar in its notebook
        transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            located.path,
            dtype=torch_dtype,
            use_safetensors=use_safetensors,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as an MmflowError, not transformers' RuntimeError
            **_safe(located),
        )
    except (OSError, RuntimeError, ValueError) as err:
        raise MmflowError(f"Checkpoint {where}: its weights cannot be loaded ({_first_line(err)})") from None
    _check_loaded(model, info, str(where))
    model.to(device).eval()
    processor = _processor(located, config, where)
    decoder_layers(model)  # fail early if the language model has no layer-indexed attention
    return model, processor


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _safe(located: Any) -> dict[str, Any]:
    """from_pretrained options: never run checkpoint code; a located folder is read without the hub."""
    return {"local_files_only": located.folder is not None, "trust_remote_code": False}


def _config(located: Any, where: Any) -> Any:
    """The located checkpoint's transformers config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(located.path, **_safe(located))
    except (OSError, ValueError) as err:
        raise MmflowError(f"Checkpoint {where}: its config.json cannot be read ({_first_line(err)})") from None


def _processor(located: Any, config: Any, where: Any) -> Any:
    """The located checkpoint's processor (:func:`~mmflow.families.build_processor`: image-only where a family's
    full processor needs torchvision and it is missing)."""
    try:
        return build_processor(located.path, config, _safe(located))
    except (OSError, ValueError, TypeError, ImportError) as err:  # ImportError: e.g. SmolVLM's without num2words
        raise MmflowError(f"Checkpoint {where}: its processor cannot be loaded ({_first_line(err)})") from None


def load_processor(name_or_path: str, local_files_only: bool | None = None) -> tuple[Any, Any]:
    """A checkpoint's config and processor, and a weightless model skeleton (on the meta device) with its
    geometry: what ``make check-data`` needs, without loading any weight.

    Returns:
        ``(skeleton, processor)``; ``skeleton.config`` is the config.

    Raises:
        MmflowError: as :func:`load_model` does for the folder, the config and custom code.
    """
    import transformers

    located = locate(name_or_path, local_files_only)
    if located.folder:
        check_configs(located.folder)
    where = located.folder or name_or_path
    config = _config(located, where)
    processor = _processor(located, config, where)
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


def deepstack_layers(model: LlavaModel) -> int:
    """How many first decoder layers get vision features added to their outputs at the image positions (Qwen3-VL's
    DeepStack; the hidden states transformers records for those layers are taken before the addition); 0 for
    families without DeepStack."""
    path = family_of(model).deepstack
    return len(_attr(model.config, path) or ()) if path else 0


def check_reusable_from(model: LlavaModel, inputs: dict[str, torch.Tensor], first: int) -> None:
    """Raise unless the clean run's hidden states from position ``first`` on are each decoder layer's input, as the
    fast engine reuses them: never for a family whose clean prefix itself would change (Gemma 3's bidirectional
    image: :func:`~mmflow.families.check_fast_engine`); DeepStack adds vision features to the first layers' outputs
    at the image positions after transformers records them, so a suffix from ``first`` must hold no image token.

    Raises:
        MmflowError: naming the family's reason, or the last image position, and ``engine="naive"``.
    """
    check_fast_engine(model)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero() if deepstack_layers(model) else []
    if len(image) and first <= int(image.max()):
        raise MmflowError(
            f"This model adds DeepStack vision features to the outputs of its first {deepstack_layers(model)} "
            f"decoder layers at the image positions (up to position {int(image.max())}), and a flow's first target "
            f"is position {first}: the fast engine reuses clean hidden states only after the image; use engine='naive'"
        )


def token_pool(model: LlavaModel) -> int:
    """The side (in ViT patches) of the square of patches averaged into one image token: the projector's pooling
    kernel for Gemma 3 (``AvgPool2d``: 64 x 64 patches -> 16 x 16 tokens, 4), 1 for families without pooling."""
    path = family_of(model).token_pool
    return int(_attr(model, path)) if path else 1


def sequence_shuffle(model: LlavaModel) -> Any:
    """The family's pixel shuffle over a tile's patch sequence (see :attr:`~mmflow.families.Family.sequence_shuffle`),
    or None for a family with one token per patch."""
    path = family_of(model).sequence_shuffle
    return _attr(model, path) if path else None


def pack_image_features(model: LlavaModel) -> Any:
    """The family's anyres feature packing function, or None for single-tile families."""
    path = family_of(model).pack_image_features
    return _attr(model, path) if path else None
