"""Model inputs: the paper's prompt, and the token groups of an example (image, question, last, options, objects,
patches), located through the tokenizer's offset mappings."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mmflow.data import Example
from mmflow.errors import MmflowError
from mmflow.models import LlavaModel
from mmflow.paper import INSTRUCTION, llava15_prompt
from mmflow.patches import patch_groups


def build_prompt(processor, question: str) -> str:
    """The paper's input text: the processor's chat template if it has one, else the LLaVA-1.5 form."""
    if getattr(processor, "chat_template", None):
        text = f"{question}\n{INSTRUCTION}"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return llava15_prompt(question)


def find_span(text: str, phrase: str, start: int = 0, end: int | None = None, prefix: bool = False) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of ``phrase`` in ``text[start:end]`` (case-insensitive).

    With ``prefix`` the match may continue into a longer word (``circle`` matches ``circles``).

    Raises:
        MmflowError: if there is no such occurrence.

    Example:
        >>> find_span("Are there circles or squares?", "circle", prefix=True), find_span("a red or blue car", "Blue")
        ((10, 17), (9, 13))
    """
    tail = r"\w*" if prefix else r"(?!\w)"
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + tail, re.IGNORECASE)
    match = pattern.search(text, start, len(text) if end is None else end)
    if match is None:
        raise MmflowError(f"'{phrase}' not found in {text[start:end]!r}")
    return match.span()


def tokens_in_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``span`` (zero-width tokens never do).

    Example:
        >>> tokens_in_span([(0, 3), (3, 3), (3, 7), (8, 10)], (2, 8))
        [0, 2]
    """
    lo, hi = span
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]


@dataclass
class Encoded:
    """A model input for one example with its token groups (positions in the language model's sequence)."""

    inputs: dict[str, torch.Tensor]
    groups: dict[str, list[int]]
    prompt: str

    @property
    def length(self) -> int:
        """Sequence length of the language model's input."""
        return int(self.inputs["input_ids"].shape[1])


def _expanded_offsets(prompt: str, image_token: str, n_image: int, offsets: torch.Tensor) -> list[tuple[int, int]]:
    """Token offsets mapped from the processor's image-expanded text back to ``prompt`` coordinates.

    Every image token maps to the span of the single ``image_token`` placeholder in ``prompt``.
    """
    first = prompt.find(image_token)
    run_end = first + len(image_token) * n_image  # end of the expanded image run
    shift = (n_image - 1) * len(image_token)
    out = []
    for a, b in offsets.tolist():
        if first < 0 or b <= first:
            out.append((a, b))
        elif a >= run_end:
            out.append((a - shift, b - shift))
        else:
            out.append((first, first + len(image_token)))
    return out


def encode(
    processor,
    image: Image.Image,
    question: str,
    options: Sequence[str] = (),
    objects: Sequence[str] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
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

    Returns:
        The inputs and the groups ``image`` (all image-token positions after expansion), ``question``, ``last``,
        ``true_option``/``false_option`` and ``object:<name>``.

    Raises:
        MmflowError: if the image is not a PIL image, or the question or an option is not in the prompt.
    """
    if not isinstance(image, Image.Image):
        raise MmflowError(f"Expected a PIL image, got {type(image).__name__}")
    prompt = build_prompt(processor, question)
    q_start = prompt.find(question)
    if not question or q_start < 0:
        raise MmflowError(f"Question {question!r} not found in the prompt {prompt!r}")
    q_span = (q_start, q_start + len(question))
    batch = processor(images=image.convert("RGB"), text=prompt, return_offsets_mapping=True, return_tensors="pt")
    offsets_t = batch.pop("offset_mapping")[0]
    ids = batch["input_ids"][0]
    image_pos = (ids == processor.image_token_id).nonzero().flatten().tolist()
    offsets = _expanded_offsets(prompt, processor.image_token, len(image_pos), offsets_t)
    groups: dict[str, list[int]] = {
        "image": image_pos,
        "question": tokens_in_span(offsets, q_span),
        "last": [len(ids) - 1],
    }
    for name, option in zip(("true_option", "false_option"), options):
        try:
            groups[name] = tokens_in_span(offsets, find_span(prompt, option, *q_span))
        except MmflowError as err:
            raise MmflowError(f"Option {option!r} not found in the question {question!r}") from err
    for obj in objects:
        with contextlib.suppress(MmflowError):  # GQA object names are not always spelled out in the question
            groups[f"object:{obj}"] = tokens_in_span(offsets, find_span(prompt, obj, *q_span, prefix=True))
    inputs = {k: v.to(device) for k, v in batch.items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return Encoded(inputs=inputs, groups=groups, prompt=prompt)


def encode_example(
    processor,
    example: Example,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: LlavaModel | None = None,
) -> Encoded:
    """:func:`encode` an :class:`~mmflow.data.Example`; with ``model`` also its ``related_patches``/``other_patches``.

    Raises:
        MmflowError: if the image's size is not the one the data states.
    """
    image = example.image()
    if image.size != tuple(example.image_size):
        raise MmflowError(f"Example {example.example_id}: image is {image.size}, the data says {example.image_size}")
    encoded = encode(processor, image, example.question, example.options, example.objects, device, dtype)
    if model is not None:
        if example.boxes is None:
            raise MmflowError(
                f"{example.where}: the data has no box columns (e.g. 'central object x/y/w/h'), which the patch "
                "groups (related/other patches) need"
            )
        encoded.groups.update(
            patch_groups(model, processor, encoded.groups["image"], example.image_size, example.boxes)
        )
    return encoded
