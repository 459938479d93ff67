"""The model-family table: where each supported family keeps the parts mmflow needs, recognised by its config
class (structure, never the checkpoint's name), and how its processor is built.

Adding a family is one :class:`Family` entry in :data:`FAMILIES` plus a test that loads a tiny checkpoint of it.
"""

from __future__ import annotations

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
    #: text tokens that frame an image's tokens (own group ``image_markers``, never in ``image``, with any other text
    #: token inside the block they frame, e.g. Idefics3's newlines between rows of tiles)
    image_markers: tuple[str, ...] = ()
    #: the official prompt ``inputs="paper"`` builds (see :func:`mmflow.inputs.paper_template`); None: chosen by
    #: the backbone (the paper's Vicuna / Llama-3 templates)
    paper_template: str | None = None
    #: the paper's inputs pad the image to a square with the mean colour first (the official LLaVA-1.5 code)
    paper_pads: bool = False
    #: how the image processor lays out pixels: "tiles" ((tiles, 3, H, W)) or "merged_patches" (Qwen: one row per
    #: 14 px patch, ``merge_size``\ :sup:`2` consecutive rows per image token)
    pixel_layout: str = "tiles"
    #: the processor class, built image-only (no video processor) where torchvision is missing; None: AutoProcessor
    image_only_processor: str | None = None
    #: the model's own pixel shuffle over one tile's flattened patch sequence (Idefics3 / SmolVLM's connector:
    #: ``(tiles, patches, channels), scale_factor -> (tiles, tokens, channels * scale_factor**2)``, a token per
    #: ``scale_factor`` x ``scale_factor`` block of patches); None: one token per patch
    sequence_shuffle: str | None = None
    #: the views an image is seen in, in the order of its tiles, each its own patch group
    #: (``related_patches@<view>``): Idefics3's ``tiles`` (the crops) and ``global`` (the whole image, last);
    #: () for one view
    patch_views: tuple[str, ...] = ()
    #: the family's prompts (its chat template, its official format) start with the BOS token as text, so the
    #: tokenizer is asked to add none (Mistral-Small-3.1's tokenizer would add a second one)
    bos_in_prompt: bool = False


_QWEN_VL = dict(
    rope_index="model.get_rope_index",
    image_markers=("<|vision_start|>", "<|vision_end|>"),
    paper_template="qwen_vl",
    pixel_layout="merged_patches",
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
    sequence_shuffle="model.connector.pixel_shuffle",
    patch_views=("tiles", "global"),
    bos_in_prompt=True,  # the template writes the BOS; Idefics3-8B's Llama-3 tokenizer would add a second one
)

#: The supported families, most specific first.
FAMILIES = (
    Family(
        "llava-next",
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        pack_image_features="model.pack_image_features",
    ),
    Family("llava", "LlavaConfig", "LlavaForConditionalGeneration", paper_pads=True),
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
)


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
        "e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-onevision-qwen2-0.5b-ov-hf, "
        "Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, HuggingFaceTB/SmolVLM-256M-Instruct or "
        "HuggingFaceTB/SmolVLM2-256M-Video-Instruct."
    )


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


def build_processor(path: str, config: Any, options: dict[str, Any]) -> Any:
    """The processor of the checkpoint at ``path`` (a folder or a hub id; ``options`` for ``from_pretrained``).

    ``AutoProcessor`` where it can be built; for a family with an :attr:`Family.image_only_processor` and no
    torchvision installed, that class built from the checkpoint's image processor (its PIL variant), tokenizer and
    chat template only: images are all mmflow feeds it.
    """
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    name = family_of(config).image_only_processor
    if name is None or is_torchvision_available():
        return AutoProcessor.from_pretrained(path, **options)
    return _image_only(getattr(transformers, name)).from_pretrained(path, **options)
