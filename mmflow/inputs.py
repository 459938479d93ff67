"""Model inputs: the paper's prompt, and the token groups of an example (image, question, last, options, objects,
patches), located through the tokenizer's offset mappings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from mmflow.data import Example
from mmflow.errors import MmflowError
from mmflow.images import box_issues, to_rgb
from mmflow.models import LlavaModel, family_of, view_options
from mmflow.paper import (
    INSTRUCTION,
    LLAMA3_SUFFIX,
    LLAMA3_SYSTEM,
    PAPER_USER,
    gemma3_prompt,
    idefics3_prompt,
    internvl_prompt,
    llava15_prompt,
    mistral_prompt,
    qwen3_vl_prompt,
    qwen15_prompt,
    qwen_vl_prompt,
    vicuna_prompt,
)
from mmflow.params import resolve_inputs  # noqa: F401 (re-exported)
from mmflow.patches import model_view, patch_groups
from mmflow.words import locate_object, locate_options

LLAMA3_HEADER = "<|start_header_id|>"


def paper_template(processor, config) -> str:
    """The official conversation template for a checkpoint, chosen by its structure (never its name).

    Returns:
        The family's own template if it has one (``"qwen_vl"`` for Qwen2-VL and Qwen2.5-VL, ``"qwen_1_5"`` for
        LLaVA-OneVision, ``"qwen3_vl"`` for Qwen3-VL, ``"internvl2_5"`` for InternVL, ``"mistral"`` for
        Pixtral-12B and Mistral-Small-3.1, ``"gemma3"`` for Gemma 3, ``"idefics3"`` for Idefics3 / SmolVLM); for
        LLaVA-1.5 and LLaVA-NeXT ``"llava_llama_3"`` if the tokenizer has Llama-3's header tokens, ``"vicuna_v1"`` for
        another Llama backbone (Vicuna).

    Raises:
        MmflowError: for a LLaVA backbone the paper did not use (e.g. Mistral, Qwen2): use ``inputs="processor"``.
    """
    if family_of(config).paper_template is not None:
        return family_of(config).paper_template
    tokenizer = processor.tokenizer
    if LLAMA3_HEADER in tokenizer.get_vocab():
        if not getattr(tokenizer, "chat_template", None):
            raise MmflowError("This Llama-3 tokenizer has no chat template, which the paper's llava_llama_3 inputs use")
        return "llava_llama_3"
    backbone = config.get_text_config().model_type
    if backbone == "llama":
        return "vicuna_v1"
    raise MmflowError(
        f"The paper's inputs are defined for its Vicuna and Llama-3 backbones; this checkpoint's language model is "
        f"{backbone!r}: use inputs='processor'"
    )


def build_prompt(processor, question: str, inputs: str = "processor", config=None) -> str:
    """The input text for a question.

    Args:
        processor: the checkpoint's processor.
        question: the question.
        inputs: ``"paper"``: the family's official conversation template (:func:`paper_template`), written out by
            mmflow: LLaVA-1.5 / 1.6-Vicuna ``"<vicuna system prompt> USER: <image>\\n{question} \\nAnswer ...
            ASSISTANT:"`` (the HF processors drop the system prompt); Llama3-LLaVA-NeXT its llava_llama_3 turn;
            Qwen2-VL / Qwen2.5-VL the ChatML turn with the default system prompt "You are a helpful assistant." and
            ``<|vision_start|><|image_pad|><|vision_end|>{question}\\n<instruction>`` (:func:`~mmflow.paper.
            qwen_vl_prompt`), which is exactly what ``"processor"`` gives with the released chat template;
            Qwen3-VL the same turn without a system turn (its released template adds none:
            :func:`~mmflow.paper.qwen3_vl_prompt`), again exactly what ``"processor"`` gives;
            LLaVA-OneVision the ``qwen_1_5`` conversation of its training code (same system prompt, ``<image>\\n``
            before the question: :func:`~mmflow.paper.qwen15_prompt`), which the llava-hf template does not give;
            InternVL the ``internvl2_5`` conversation of its chat code (its system message "你是书生·万象...", the
            image on its own line: :func:`~mmflow.paper.internvl_prompt`), which the -hf template does not give;
            Pixtral-12B / Mistral-Small-3.1 Mistral's ``<s>[INST][IMG]{question}\\n<instruction>[/INST]``
            (:func:`~mmflow.paper.mistral_prompt`), which is what Pixtral-12B's chat template gives (Mistral-Small-3.1's
            adds its dated default system prompt);
            Gemma 3 its chat turn ``<bos><start_of_turn>user\\n<start_of_image>{question}\\n<instruction>
            <end_of_turn>\\n<start_of_turn>model\\n`` (:func:`~mmflow.paper.gemma3_prompt`), exactly what
            ``"processor"`` gives with the released chat template;
            Idefics3 / SmolVLM the released chat template's turn ``<bos>User:<image>{question}\\n<instruction>
            <end_of_utterance>\\nAssistant:`` (:func:`~mmflow.paper.idefics3_prompt`, ``<bos>`` the tokenizer's
            BOS), which is exactly what ``"processor"`` gives with the released chat template.
            ``"processor"``: the processor's chat template if it has one (the question, a newline and the
            instruction as the user's text after the image), else the LLaVA-1.5 form without a system prompt.
        config: the model's config (needed for ``"paper"``).
    """
    if inputs == "paper":
        template = paper_template(processor, config)
        own = {
            "qwen_vl": qwen_vl_prompt,
            "qwen_1_5": qwen15_prompt,
            "internvl2_5": internvl_prompt,
            "qwen3_vl": qwen3_vl_prompt,
            "mistral": mistral_prompt,
            "gemma3": gemma3_prompt,
        }
        if template in own:
            return own[template](question)
        if template == "idefics3":
            return idefics3_prompt(question, processor.tokenizer.bos_token or "")
        if template == "vicuna_v1":
            return vicuna_prompt(question)
        messages = [
            {"role": "system", "content": LLAMA3_SYSTEM},
            {"role": "user", "content": PAPER_USER.format(question=question)},
        ]
        rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered + LLAMA3_SUFFIX
    if getattr(processor, "chat_template", None):
        text = f"{question}\n{INSTRUCTION}"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return llava15_prompt(question)


def tokens_in_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``span`` (zero-width tokens never do).

    Example:
        >>> tokens_in_span([(0, 3), (3, 3), (3, 7), (8, 10)], (2, 8))
        [0, 2]
    """
    lo, hi = span
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]


def image_markers(processor, ids: torch.Tensor, config) -> list[int]:
    """Positions of the text tokens that frame the image (Qwen's ``<|vision_start|>``/``<|vision_end|>``, Idefics3's
    ``<fake_token_around_image>``, ``<row_r_col_c>`` and ``<global-img>``), by token id, and, for a family with
    :attr:`~mmflow.families.Family.markers_span_block`, of any other text token inside the block they frame with
    the image tokens (Idefics3's newlines after each row of tiles); empty for a family without such tokens (LLaVA).

    Raises:
        MmflowError: if the tokenizer lacks one of the family's marker tokens.
    """
    markers = family_of(config).image_markers
    marker_ids = [processor.tokenizer.convert_tokens_to_ids(token) for token in markers]
    unknown = [t for t, i in zip(markers, marker_ids) if i is None or i == processor.tokenizer.unk_token_id]
    if unknown:
        raise MmflowError(f"The tokenizer has no token {unknown[0]!r}, which this model family frames images with")
    if not markers:
        return []
    found = torch.isin(ids, torch.tensor(marker_ids, dtype=ids.dtype))
    if not found.any() or not family_of(config).markers_span_block:
        return found.nonzero().flatten().tolist()
    image = ids == config.image_token_id  # the tokens image features replace (Gemma 3: the soft tokens)
    block = (found | image).nonzero().flatten()
    inside = torch.zeros_like(found)
    inside[int(block[0]) : int(block[-1]) + 1] = True
    return (inside & ~image).nonzero().flatten().tolist()


def _replacement(processor, batch, image_pos: list[int]) -> tuple[tuple[int, int], int]:
    """The image placeholder's span in the prompt and where, in the processor's expanded text, the run that
    replaced it ends, from the processor's own record (``text_replacement_offsets``: ``span`` in the prompt,
    ``new_span`` in the expanded text; whatever the run holds besides image tokens, e.g. Pixtral's ``[IMG_BREAK]``,
    Idefics3's tile tags and newlines, Gemma 3's framed views and pan-and-scan text).

    Raises:
        MmflowError: naming the processor class if it returns no such record or no placeholder; if the image tokens
            are not whole framed views (Gemma 3 without ``config``: the processor's ``image_token_id`` is then the
            ``<start_of_image>`` marker, not the soft token).
    """
    name = type(processor).__name__
    replaced = batch.pop("text_replacement_offsets", None)
    if not replaced or not replaced[0]:
        raise MmflowError(
            f"{name} returned no text_replacement_offsets for the image placeholder: mmflow needs the processor's "
            "record of where the image's tokens go (a transformers processor built on ProcessorMixin's expansion)"
        )
    if getattr(processor, "full_image_sequence", None) is not None:  # Gemma 3: whole views of image_seq_length
        views, rest = divmod(len(image_pos), processor.image_seq_length)
        if views < 1 or rest:
            raise MmflowError(
                f"{len(image_pos)} image tokens are not whole views of {processor.image_seq_length} for {name}: pass "
                "the model's config (config=model.config), whose image_token_id is the soft token the processor "
                "expands the image into"
            )
    first = replaced[0][0]
    return (int(first["span"][0]), int(first["span"][1])), int(first["new_span"][1])


def _spells_bos(tokenizer, prompt: str) -> bool:
    """Whether ``prompt`` already starts with the tokenizer's BOS token as text (the chat templates of Llama-3,
    Mistral, Gemma 3 and Idefics3 write it), so the tokenizer must add no second one.

    Example:
        >>> from types import SimpleNamespace
        >>> _spells_bos(SimpleNamespace(bos_token="<s>"), "<s>[INST]"), _spells_bos(SimpleNamespace(bos_token=None), "")
        (True, False)
    """
    return bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)


@dataclass
class Encoded:
    """A model input for one example with its token groups (positions in the language model's sequence)."""

    inputs: dict[str, torch.Tensor]
    groups: dict[str, list[int]]
    prompt: str
    #: how each option and object group was found (see :mod:`mmflow.words`), or why it was not
    located: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Sequence length of the language model's input."""
        return int(self.inputs["input_ids"].shape[1])


def _expanded_offsets(span: tuple[int, int], run_end: int, offsets: torch.Tensor) -> list[tuple[int, int]]:
    """Token offsets mapped from the processor's image-expanded text back to ``prompt`` coordinates.

    The image placeholder at ``span`` of the prompt became a run ending at character ``run_end`` of the expanded
    text; every token of the run maps to the placeholder's span, every token after it shifts back.

    Example:
        >>> _expanded_offsets((1, 4), 9, torch.tensor([[0, 1], [1, 3], [3, 6], [6, 9], [9, 10]]))
        [(0, 1), (1, 4), (1, 4), (1, 4), (4, 5)]
    """
    first, end = span
    shift = run_end - end
    out = []
    for a, b in offsets.tolist():
        if b <= first:
            out.append((a, b))
        elif a >= run_end:
            out.append((a - shift, b - shift))
        else:
            out.append((first, end))
    return out


def encode(
    processor,
    image: Image.Image,
    question: str,
    options: Sequence[str] = (),
    objects: Sequence[str] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    inputs: str = "processor",
    config=None,
) -> Encoded:
    """Build the model input for one image and question, and locate its token groups.

    Args:
        processor: the model's processor.
        image: the image.
        question: the question, as it appears in the prompt.
        options: (true, false) options of a Choose question.
        objects: object names; each found word becomes a group ``object:<name>``.
        device: where the input tensors go.
        dtype: dtype of the pixel values (None: the processor's).
        inputs: ``"paper"`` (official prompt; single-tile images padded to a square with the mean colour) or
            ``"processor"`` (see :func:`build_prompt`).
        config: the model's config (needed for ``"paper"``, the ``image_markers`` group, and for Gemma 3's soft
            image tokens and the checkpoint's pan-and-scan options, :func:`~mmflow.families.view_options`).
            A prompt that starts with the tokenizer's BOS token as text is tokenized without adding another.

    Returns:
        The inputs and the groups ``image`` (all image-token positions after expansion), ``image_markers`` (the
        text tokens framing the image, e.g. Qwen's ``<|vision_start|>``/``<|vision_end|>``, Gemma 3's
        ``<start_of_image>``/``<end_of_image>``; only with ``config``;
        empty for LLaVA, so a flow naming it is skipped by runs and refused by a sweep), ``question``, ``last``,
        ``true_option``/``false_option`` (in the question's "X or Y" slot) and ``object:<name>``; ``located`` says
        which rule found each option and object, or that it was not found (then its group is absent).

    Raises:
        MmflowError: if the image is not a PIL image or of a mode :func:`~mmflow.images.to_rgb` refuses, or the
            question is not in the prompt.
    """
    if not isinstance(image, Image.Image):
        raise MmflowError(f"Expected a PIL image, got {type(image).__name__}")
    if inputs == "paper" and config is None:
        raise MmflowError("inputs='paper' needs the model's config (config=model.config)")
    prompt = build_prompt(processor, question, inputs, config)
    q_start = prompt.find(question)
    if not question or q_start < 0:
        raise MmflowError(f"Question {question!r} not found in the prompt {prompt!r}")
    q_span = (q_start, q_start + len(question))
    batch = processor(
        images=model_view(to_rgb(image), processor, config, inputs),
        text=prompt,
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        return_tensors="pt",
        **({"add_special_tokens": False} if _spells_bos(processor.tokenizer, prompt) else {}),
        **(view_options(processor, config) if config is not None else {}),  # Gemma 3: the checkpoint's pan-and-scan
    )
    offsets_t = batch.pop("offset_mapping")[0]
    ids = batch["input_ids"][0]
    image_id = config.image_token_id if config is not None else processor.image_token_id  # Gemma 3: soft tokens
    image_pos = (ids == image_id).nonzero().flatten().tolist()  # the tokens image features replace
    offsets = _expanded_offsets(*_replacement(processor, batch, image_pos), offsets_t)
    groups: dict[str, list[int]] = {
        "image": image_pos,
        "question": tokens_in_span(offsets, q_span),
        "last": [len(ids) - 1],
    }
    if config is not None:  # the family tells which tokens frame the image
        groups["image_markers"] = image_markers(processor, ids, config)
    located: dict[str, str] = {}
    if options:
        try:
            *spans, rule = locate_options(prompt, *options, *q_span)
        except MmflowError as err:  # no notebook flow needs the options: record why, do not fail the example
            located.update({"true_option": f"not found ({err})", "false_option": f"not found ({err})"})
        else:
            for name, span in zip(("true_option", "false_option"), spans):
                groups[name], located[name] = tokens_in_span(offsets, span), rule
    for obj in objects:
        try:
            span, rule = locate_object(prompt, obj, *q_span)
        except MmflowError:  # GQA object names are not always spelled out in the question
            located[f"object:{obj}"] = "not found"
        else:
            groups[f"object:{obj}"], located[f"object:{obj}"] = tokens_in_span(offsets, span), rule
    inputs = {k: v.to(device) for k, v in batch.items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return Encoded(inputs=inputs, groups=groups, prompt=prompt, located=located)


def encode_example(
    processor,
    example: Example,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: LlavaModel | None = None,
    inputs: str = "processor",
    config=None,
    patches: bool | None = None,
) -> Encoded:
    """:func:`encode` an :class:`~mmflow.data.Example`, with its ``related_patches``/``other_patches``.

    Args:
        processor: the checkpoint's processor.
        example: the example.
        device: where the input tensors go.
        dtype: dtype of the pixel values.
        model: the model (its config for ``inputs="paper"``, its geometry for the patch groups).
        inputs: ``"paper"`` or ``"processor"`` (see :func:`encode`).
        config: the model's config, if ``model`` is not given.
        patches: compute the patch groups (default: when ``model`` is given).

    Raises:
        MmflowError: naming the example if its image is not of the size the data states, or if patch groups are
            asked for and the data has no box columns or a box breaks the rule of :func:`~mmflow.images.box_issues`.
    """
    image = example.image()
    if image.size != tuple(example.image_size):
        raise MmflowError(f"{example.where}: the image is {image.size}, the data says {example.image_size}")
    config = config if config is not None else getattr(model, "config", None)
    encoded = encode(
        processor, image, example.question, example.options, example.objects, device, dtype, inputs, config
    )
    if patches if patches is not None else model is not None:
        if model is None:
            raise MmflowError("patch groups need the model (model=...)")
        if example.boxes is None:
            raise MmflowError(
                f"{example.where}: the data has no box columns (e.g. 'central object x/y/w/h'), which the patch "
                "groups (related/other patches) need"
            )
        errors, _ = box_issues(example.image_size, example.boxes, example.box_columns)
        if errors:
            raise MmflowError(f"{example.where}: {'; '.join(errors)}; the patch groups need every box in the image")
        groups = patch_groups(model, processor, encoded.groups["image"], example.image_size, example.boxes, inputs)
        encoded.groups.update(groups)
    return encoded
