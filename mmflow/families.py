"""The model-family table: where each supported family keeps the parts mmflow needs, recognised by its config
class (structure, never the checkpoint's name), and how its processor is built.

Adding a family is one :class:`Family` entry in :data:`FAMILIES` plus a test that loads a tiny checkpoint of it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

from mmflow.errors import MmflowError


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the parts mmflow needs (attribute paths from the top-level model)."""

    name: str
    config_class: str  #: transformers config class that identifies the family (structure, never the name)
    model_class: str  #: its conditional-generation class
    text_model: str = "model.language_model"  #: the decoder-only language model
    layers: str = "layers"  #: decoder layers, relative to the text model
    final_norm: str = "norm"  #: final norm, relative to the text model
    rotary_embedding: str = "rotary_emb"  #: rotary position embedding, relative to the text model
    mlp: str = "mlp"  #: the feed-forward block, relative to a decoder layer
    #: attention function the knockout wraps under eager attention ("module:function"); None: the
    #: ``eager_attention_forward`` of the module that defines the backbone's attention class
    eager_attention: str | None = None
    #: anyres feature packing (unpadding + newline tokens), None for single-tile families
    pack_image_features: str | None = None
    #: multimodal rotary positions: the model's own ``(input_ids, image_grid_thw, attention_mask,
    #: mm_token_type_ids) -> ((3, batch, n) position ids, deltas)``; None: position i is i (1-D rotary)
    rope_index: str | None = None
    #: text tokens that frame an image's tokens (own group ``image_markers``, never in ``image``)
    image_markers: tuple[str, ...] = ()
    #: ``image_markers`` also holds every other text token from the first marker to the last (Idefics3's newlines
    #: between rows of tiles); False: the marker tokens only (Gemma 3's pan-and-scan text between views is in no group)
    markers_span_block: bool = False
    #: the official prompt ``inputs="paper"`` builds (see :func:`mmflow.inputs.paper_template`); None: chosen by
    #: the backbone (the paper's Vicuna / Llama-3 templates)
    paper_template: str | None = None
    #: the paper's inputs pad the image to a square with the mean colour first (the official LLaVA-1.5 code)
    paper_pads: bool = False
    #: how the image processor lays out pixels: "tiles" ((tiles, 3, H, W)), "merged_patches" (Qwen: one row per
    #: ViT patch (14 px, Qwen3-VL 16 px), ``merge_size``\ :sup:`2` consecutive rows per image token) or "native"
    #: (Pixtral: one (3, H, W) image at its own aspect ratio, one image token per ``patch_size * spatial_merge_size``
    #: cell, row by row)
    pixel_layout: str = "tiles"
    #: the processor class, built image-only (no video processor) where torchvision is missing; None: AutoProcessor
    image_only_processor: str | None = None
    #: the model's own downsampling of each tile's patch grid into image tokens (InternVL's ``pixel_shuffle``,
    #: ``(tiles, rows, cols, channels), scale_factor -> (tiles, rows', cols', channels')``); None: one token per patch
    pixel_shuffle: str | None = None
    #: the views an image is seen in, each its own patch group (``related_patches@<view>``): InternVL's ``tiles``
    #: (the dynamic crops) and ``thumbnail`` (the whole image, last, only when there is more than one crop),
    #: Idefics3's ``tiles`` and ``global`` (the whole image, always the last tile); () for one view
    patch_views: tuple[str, ...] = ()
    #: DeepStack (Qwen3-VL): config path of the vision layers whose features the model adds to the outputs of as many
    #: first decoder layers, at the image positions; None: the decoder's residual stream is its own
    deepstack: str | None = None
    #: sub-structure that tells this family apart from others of the same config class: the vision config's
    #: ``model_type`` (Pixtral-12B is a ``LlavaConfig`` with a ``"pixtral"`` vision tower); None: any
    vision_model_type: str | None = None
    #: the side (in ViT patches) of the square of patches the projector averages into one image token (Gemma 3's
    #: ``AvgPool2d``), as an attribute path from the top-level model; None: one token per patch
    token_pool: str | None = None
    #: why the fast engine cannot be exact for this family (it then refuses, naming ``engine="naive"``); None: exact
    fast_refusal: str | None = None
    #: the processor call decides how many views of an image the model sees (Gemma 3's pan-and-scan: the original,
    #: then crops, each framed by the image markers), with the options :func:`view_options` reads from the checkpoint
    processor_views: bool = False
    #: the model's own pixel shuffle over one tile's flattened patch sequence (Idefics3 / SmolVLM's connector:
    #: ``(tiles, patches, channels), scale_factor -> (tiles, tokens, channels * scale_factor**2)``, a token per
    #: ``scale_factor`` x ``scale_factor`` block of patches); None: one token per patch
    sequence_shuffle: str | None = None


_QWEN_VL = dict(
    rope_index="model.get_rope_index",
    image_markers=("<|vision_start|>", "<|vision_end|>"),
    paper_template="qwen_vl",
    pixel_layout="merged_patches",
)

_MISTRAL = dict(
    image_markers=("[IMG_BREAK]", "[IMG_END]"),
    paper_template="mistral",
    pixel_layout="native",
    image_only_processor="PixtralProcessor",
)

#: Idefics3 / SmolVLM v1 (``Idefics3Config``) and SmolVLM2 (``SmolVLMConfig``): the text model at
#: ``model.text_model``; the text tokens the processor writes around and between the image's tokens (its tiles'
#: ``<row_r_col_c>`` tags, up to the processor's 6 x 6, and the global image's tag); tiles + a global image, each
#: through the connector's pixel shuffle
_IDEFICS3 = dict(
    text_model="model.text_model",
    image_markers=(
        "<fake_token_around_image>",
        "<global-img>",
        *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    ),
    paper_template="idefics3",
    markers_span_block=True,
    sequence_shuffle="model.connector.pixel_shuffle",
    patch_views=("tiles", "global"),
)

#: The supported families, most specific first (a family with a sub-structure before the plain one).
FAMILIES = (
    Family(
        "llava-next",
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        pack_image_features="model.pack_image_features",
    ),
    Family("pixtral", "LlavaConfig", "LlavaForConditionalGeneration", vision_model_type="pixtral", **_MISTRAL),
    Family("llava", "LlavaConfig", "LlavaForConditionalGeneration", paper_pads=True),
    Family("mistral3", "Mistral3Config", "Mistral3ForConditionalGeneration", **_MISTRAL),
    Family(
        "llava-onevision",
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        pack_image_features="model.pack_image_features",  # (image_sizes, image_newline, vision_aspect_ratio)
        paper_template="qwen_1_5",
        image_only_processor="LlavaOnevisionProcessor",
    ),
    Family("idefics3", "Idefics3Config", "Idefics3ForConditionalGeneration", **_IDEFICS3),
    Family(
        "smolvlm",
        "SmolVLMConfig",
        "SmolVLMForConditionalGeneration",
        image_only_processor="SmolVLMProcessor",
        **_IDEFICS3,
    ),
    Family(
        "internvl",
        "InternVLConfig",
        "InternVLForConditionalGeneration",
        image_markers=("<img>", "</img>"),
        paper_template="internvl2_5",
        image_only_processor="InternVLProcessor",
        pixel_shuffle="model.pixel_shuffle",
        patch_views=("tiles", "thumbnail"),
    ),
    Family(
        "qwen2-vl",
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        image_only_processor="Qwen2VLProcessor",
        **_QWEN_VL,
    ),
    Family(
        "qwen2.5-vl",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        image_only_processor="Qwen2_5_VLProcessor",
        **_QWEN_VL,
    ),
    Family(
        "qwen3-vl",
        "Qwen3VLConfig",
        "Qwen3VLForConditionalGeneration",
        image_only_processor="Qwen3VLProcessor",
        deepstack="vision_config.deepstack_visual_indexes",
        **{**_QWEN_VL, "paper_template": "qwen3_vl"},
    ),
    Family(
        "qwen3-vl-moe",
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        image_only_processor="Qwen3VLProcessor",
        deepstack="vision_config.deepstack_visual_indexes",
        **{**_QWEN_VL, "paper_template": "qwen3_vl"},
    ),
    Family(
        "gemma3",
        "Gemma3Config",
        "Gemma3ForConditionalGeneration",
        image_markers=("<start_of_image>", "<end_of_image>"),
        paper_template="gemma3",
        token_pool="model.multi_modal_projector.kernel_size",
        fast_refusal=(
            "each image attends to itself bidirectionally, so positions before the first target read positions "
            "after it, and the clean prefix the fast engine reuses would change; sliding-window layers use their own "
            "mask and rotary table"
        ),
        processor_views=True,
    ),
)


#: Families mmflow recognises and refuses, by config class, with the reason.
REFUSED = {
    "PaliGemmaConfig": (
        "PaliGemma's prefix (the image and the question) attends bidirectionally: an image token reads the question "
        "and a question token reads the whole prefix, so a knockout 'X->Question' and the paper's causal reading of "
        "flows (a position reads only what precedes it) do not mean the same thing. mmflow's flows assume causal "
        "self-attention over the whole sequence."
    ),
    "MllamaConfig": (
        "Mllama (Llama 3.2 Vision) feeds the image to the language model only through its cross-attention layers: "
        "no image token is in the self-attention sequence, so Image->X flows are not self-attention edges and the "
        "'image' group would be empty. (Blocking the question or last rows of the cross-attention mask in the "
        "window's cross-attention layers, as MLLMs-FlowTracker does, is another measurement; mmflow does not "
        "implement it.)"
    ),
}


def family_of(config: Any) -> Family:
    """The :class:`Family` of a config (or of a model's config), chosen by its class, not its name.

    Raises:
        MmflowError: for a config of no supported family.
    """
    import transformers

    config = getattr(config, "config", config)
    for family in FAMILIES:
        if isinstance(config, getattr(transformers, family.config_class)) and _has_sub_structure(config, family):
            return family
    for name, reason in REFUSED.items():
        if isinstance(config, getattr(transformers, name)):
            raise MmflowError(
                f"{type(config).__name__} (architectures={getattr(config, 'architectures', None)}): "
                f"mmflow refuses this family. {reason}"
            )
    raise MmflowError(
        f"Unsupported model class: config {type(config).__name__} "
        f"(architectures={getattr(config, 'architectures', None)}). "
        f"mmflow supports {', '.join(f.model_class for f in FAMILIES)} checkpoints in the Hugging Face format, "
        "e.g. llava-hf/llava-1.5-7b-hf or Qwen/Qwen2.5-VL-3B-Instruct (docs/model-families.md: one per family)."
    )


def _has_sub_structure(config: Any, family: Family) -> bool:
    """True if ``config`` has the sub-structure ``family`` asks for (its vision tower's ``model_type``)."""
    if family.vision_model_type is None:
        return True
    return getattr(getattr(config, "vision_config", None), "model_type", None) == family.vision_model_type


def check_fast_engine(model_or_config: Any) -> None:
    """Refuse the fast engine for a family it cannot be exact for (:attr:`Family.fast_refusal`).

    Raises:
        MmflowError: naming the reason and ``engine="naive"``, which is exact for every family.
    """
    family = family_of(model_or_config)
    if family.fast_refusal is not None:
        raise MmflowError(
            f"The fast engine is not exact for {family.name} models ({family.fast_refusal}): "
            'use engine="naive" (the paper\'s method, one full forward per window)'
        )


def view_options(processor: Any, model_or_config: Any) -> dict[str, Any]:
    """The checkpoint's own settings of the image options a family's processor call decides views with (Gemma 3's
    pan-and-scan, from preprocessor_config.json), to pass to every processor call: without them transformers 5.23's
    ``Gemma3Processor`` replaces them by its class defaults (``do_pan_and_scan=False`` even where the checkpoint
    says true). Empty for other families and for options the checkpoint leaves null (the released Gemma 3 configs).
    """
    if not family_of(model_or_config).processor_views:
        return {}
    options = getattr(type(processor), "images_kwargs", {})
    return {
        k: getattr(processor.image_processor, k)
        for k in options
        if getattr(processor.image_processor, k, None) is not None
    }


@cache
def _image_only(processor_class: type) -> type:
    """``processor_class`` without its video processor: the same class (name, constructor, call, chat template)
    whose sub-processors are only the image processor and the tokenizer, so no video processor (which needs
    torchvision) is loaded or class-checked; a constructor that takes the video processor as a required argument
    (SmolVLM's) gets None, and chat templates are rendered by :class:`~transformers.ProcessorMixin`'s own
    ``apply_chat_template`` (SmolVLM's override only adds the video processor's frame defaults, which it would
    read from the missing video processor) (one class per processor class)."""
    from transformers import ProcessorMixin

    def get_attributes(cls) -> list[str]:
        return [name for name in processor_class.get_attributes() if "video" not in name]

    def from_args_and_dict(cls, args, processor_dict, **kwargs):  # a constructor that needs it gets None
        dropped = {name: None for name in processor_class.get_attributes() if "video" in name}
        return super(image_only, cls).from_args_and_dict(args, processor_dict, **kwargs, **dropped)

    image_only = type(
        processor_class.__name__,
        (processor_class,),
        {
            "get_attributes": classmethod(get_attributes),
            "from_args_and_dict": classmethod(from_args_and_dict),
            "apply_chat_template": ProcessorMixin.apply_chat_template,
            "__module__": __name__,
        },
    )
    return image_only


#: The module of transformers' tokenizer class for ``mistral_common`` tokenizers.
MISTRAL_COMMON_MODULE = "transformers.tokenization_mistral_common"


class _NoInstances:
    """A class nothing is an instance of (stands for a tokenizer class whose module was never imported)."""


@contextmanager
def no_needless_mistral_import():
    """While a processor is built, transformers checks its tokenizer against every tokenizer base class, importing
    ``MistralCommonBackend``'s module to do so, which imports ``mistral_common`` and through it ``jsonschema`` and
    ``rfc3987_syntax`` (several seconds per process, e.g. per notebook kernel). A tokenizer can only be an instance
    of that class once its module is imported, so until then the check gets a class nothing is an instance of: the
    outcome of the check is the same, and a Mistral tokenizer (whose module is then imported) is checked as before.
    The original lookup is restored on exit."""
    from transformers import processing_utils

    mixin = processing_utils.ProcessorMixin
    original = mixin.__dict__["get_possibly_dynamic_module"]

    def lookup(module_name: str) -> Any:
        if module_name == "MistralCommonBackend" and MISTRAL_COMMON_MODULE not in sys.modules:
            return _NoInstances
        return original.__func__(module_name)

    mixin.get_possibly_dynamic_module = staticmethod(lookup)
    try:
        yield
    finally:
        mixin.get_possibly_dynamic_module = original


def build_processor(path: str, config: Any, options: dict[str, Any]) -> Any:
    """The processor of the checkpoint at ``path`` (a folder or a hub id; ``options`` for ``from_pretrained``).

    ``AutoProcessor`` where it can be built; for a family with an :attr:`Family.image_only_processor` and no
    torchvision installed, that class built from the checkpoint's image processor (its PIL variant), tokenizer and
    chat template only: images are all mmflow feeds it. Built without importing ``mistral_common`` unless the
    tokenizer needs it (:func:`no_needless_mistral_import`).
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    name = family_of(config).image_only_processor
    with no_needless_mistral_import():
        if name is None or is_torchvision_available():
            return AutoProcessor.from_pretrained(path, **options)
        return _image_only(_processor_class(name)).from_pretrained(path, **options)


@cache
def _processor_class(name: str) -> type:
    """The transformers processor class ``name``, also where its module imports a helper from the model's
    torchvision image processor (PixtralProcessor): that one import is then served, while the module loads, by
    the PIL image processor module of the same model, which defines the same helper; ``sys.modules`` is restored
    right after."""
    import importlib
    import importlib.util
    import sys

    import transformers

    try:
        cls = getattr(transformers, name)
        cls.get_attributes()  # a placeholder for a class whose backend is missing raises ImportError here
        return cls
    except ImportError:
        pass
    names = transformers.models.auto.processing_auto.PROCESSOR_MAPPING_NAMES
    model_type = next(  # the model type whose own module defines the class (others reuse it)
        key
        for key, value in names.items()
        if value == name and importlib.util.find_spec(f"transformers.models.{key}.processing_{key}") is not None
    )
    base = f"transformers.models.{model_type}"
    stand_in = f"{base}.image_processing_{model_type}"
    saved = sys.modules.get(stand_in)
    sys.modules[stand_in] = importlib.import_module(f"{base}.image_processing_pil_{model_type}")
    try:
        return getattr(importlib.import_module(f"{base}.processing_{model_type}"), name)
    finally:
        if saved is None:
            sys.modules.pop(stand_in, None)
        else:
            sys.modules[stand_in] = saved
