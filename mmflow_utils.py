"""mmflow: attention knockout and logit lens for LLaVA-style models.

The companion to *Cross-modal Information Flow in Multimodal Large Language Models* (Zhang, Yadav, Han,
Shutova; CVPR 2025). One small module that the notebooks import:

* loading a LLaVA / LLaVA-NeXT checkpoint (hub id, local folder, or the embedded ``shapes-llava``);
* the paper's prompt and the token groups of an example (image, question, last, options, objects);
* patch groups: image tokens whose patches overlap the question's objects (``related_patches``) or not;
* data: the embedded shapes world and the paper's GQA CSVs + image folder, as one :class:`Example` type;
* attention knockout (``naive`` reference engine and an exact ``fast`` KV-reuse engine) and the logit lens;
* cached, resumable, shardable sweeps over many examples.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

REPO_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL = "shapes-llava"
EMBEDDED_MODEL_DIR = REPO_DIR / "shapes_world" / "shapes-llava"
EMBEDDED_DATA = "shapes"
INSTRUCTION = "Answer the question using a single word or phrase."
LLAVA15_TEMPLATE = "USER: <image>\n{question}\n" + INSTRUCTION + " ASSISTANT:"
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")


class MmflowError(ValueError):
    """A clear, user-facing error that names what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _model_class(config: Any) -> type:
    """The conditional-generation class for a config, chosen by the config's structure (not its name)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration

    if isinstance(config, LlavaNextConfig):
        return LlavaNextForConditionalGeneration
    if isinstance(config, LlavaConfig):
        return LlavaForConditionalGeneration
    raise MmflowError(
        f"Unsupported model class: config {type(config).__name__} (architectures={getattr(config, 'architectures', None)}). "
        "mmflow supports LLaVA (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration) "
        "checkpoints in the Hugging Face format, e.g. llava-hf/llava-1.5-7b-hf or llava-hf/llava-v1.6-vicuna-7b-hf."
    )


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded model's name to its folder; other names (hub ids, folders) pass through."""
    return str(EMBEDDED_MODEL_DIR) if name_or_path == EMBEDDED_MODEL else str(name_or_path)


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """Load a LLaVA-family model and its processor by hub id, local folder or ``"shapes-llava"``.

    The model class is chosen from the checkpoint's config structure. Without network (or with
    ``HF_HUB_OFFLINE=1``) a hub id must already be in the Hugging Face cache; otherwise a :class:`MmflowError`
    says what is missing and how to get it.
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
    cls = _model_class(config)
    model = cls.from_pretrained(path, dtype=torch_dtype, local_files_only=local_files_only)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
    decoder_layers(model)  # fail early if the language model has no layer-indexed attention
    return model, processor


def text_model(model: Any) -> Any:
    """The decoder-only language model inside a LLaVA model."""
    return model.model.language_model


def decoder_layers(model: Any) -> Any:
    """The language model's decoder layers; checks that each attention module knows its layer index."""
    layers = getattr(text_model(model), "layers", None)
    if layers is None or not all(hasattr(layer.self_attn, "layer_idx") for layer in layers):
        raise MmflowError(
            f"Unsupported language model {type(text_model(model)).__name__}: mmflow needs decoder layers whose "
            "self-attention has a layer_idx (Llama, Mistral, Qwen2 backbones)."
        )
    return layers


def num_layers(model: Any) -> int:
    """Number of decoder layers of the language model."""
    return len(decoder_layers(model))


# ----------------------------------------------------------------------------------------------------------
# Prompt and token groups
# ----------------------------------------------------------------------------------------------------------


def build_prompt(processor: Any, question: str) -> str:
    """The paper's input: the processor's chat template if it has one, else the LLaVA-1.5 form."""
    text = f"{question}\n{INSTRUCTION}"
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return LLAVA15_TEMPLATE.format(question=question)


def find_span(text: str, phrase: str, start: int = 0, end: int | None = None, prefix: bool = False) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of ``phrase`` in ``text[start:end]`` (case-insensitive).

    With ``prefix`` the match may continue into a longer word (``circle`` matches ``circles``).
    """
    tail = r"\w*" if prefix else r"(?!\w)"
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + tail, re.IGNORECASE)
    match = pattern.search(text, start, len(text) if end is None else end)
    if match is None:
        raise MmflowError(f"'{phrase}' not found in {text[start:end]!r}")
    return match.span()


def tokens_in_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``span`` (zero-width tokens never do)."""
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
    processor: Any,
    image: Image.Image,
    question: str,
    options: Sequence[str] = (),
    objects: Sequence[str] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Encoded:
    """Build the model input for one image and question, and locate its token groups.

    Groups: ``image`` (all image-token positions after expansion), ``question`` (the question's own tokens,
    found through offset mappings), ``last``, ``true_option``/``false_option`` (from ``options``, the true
    one first) and ``object:<name>`` for each object word.
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


# ----------------------------------------------------------------------------------------------------------
# Patch groups
# ----------------------------------------------------------------------------------------------------------

RELATED, OTHER, NEITHER = 1.0, 0.0, -1.0


def box_mask(size: tuple[int, int], boxes: Iterable[Sequence[float]]) -> Image.Image:
    """An RGB mask of an image of ``size`` (W, H): boxes ``(x, y, w, h)`` red, everything else green."""
    mask = Image.new("RGB", size, (0, 255, 0))
    pixels = np.asarray(mask).copy()
    for x, y, w, h in boxes:
        x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
        x1, y1 = min(size[0], math.ceil(x + w)), min(size[1], math.ceil(y + h))
        pixels[y0:y1, x0:x1] = (255, 0, 0)
    return Image.fromarray(pixels)


def _patch_labels(tile: torch.Tensor, patch: int) -> torch.Tensor:
    """Per ViT patch (row-major) of one processed (3, H, W) mask tile: RELATED if any pixel is red."""
    red = (tile[0] - tile[1]) > 127
    h, w = red.shape[0] // patch, red.shape[1] // patch
    cells = red[: h * patch, : w * patch].reshape(h, patch, w, patch).any(dim=3).any(dim=1)
    return torch.where(cells.flatten(), RELATED, OTHER)


def image_token_labels(model: Any, processor: Any, size: tuple[int, int], boxes: Iterable[Sequence[float]]) -> torch.Tensor:
    """Label of every image token of an image of ``size`` (W, H): RELATED, OTHER, or NEITHER (CLS, newline).

    The box mask goes through the processor's own image geometry (resize, crop, pad, anyres tiling, with
    nearest-neighbour resampling and no normalisation) and, for LLaVA-NeXT, the model's own feature packing
    (unpadding and newline tokens), so the labels line up with the image tokens by construction.
    """
    from transformers.image_utils import PILImageResampling

    mask = box_mask(size, boxes)
    pixels = processor.image_processor(
        mask, resample=PILImageResampling.NEAREST, do_rescale=False, do_normalize=False, return_tensors="pt"
    )
    cfg = model.config
    patch = cfg.vision_config.patch_size
    tiles = pixels["pixel_values"][0]
    if tiles.dim() == 3:
        tiles = tiles[None]
    per_tile = torch.stack([_patch_labels(tile, patch) for tile in tiles])  # (n_tiles, patches)
    strategy = cfg.vision_feature_select_strategy
    if "image_sizes" in pixels:  # anyres: let the model pack the labels exactly like image features
        if strategy != "default":
            raise MmflowError(f"Anyres patch groups need vision_feature_select_strategy='default', not {strategy!r}")
        packed, _ = model.model.pack_image_features(
            [per_tile[..., None]], pixels["image_sizes"], strategy, image_newline=torch.tensor([NEITHER])
        )
        return packed[0][:, 0]
    labels = per_tile[0]
    return torch.cat([torch.tensor([NEITHER]), labels]) if strategy == "full" else labels


def patch_groups(
    model: Any, processor: Any, encoded: Encoded, size: tuple[int, int], boxes: Sequence[Sequence[float]]
) -> dict[str, list[int]]:
    """``related_patches`` / ``other_patches``: image-token positions whose patch overlaps any box, or none."""
    labels = image_token_labels(model, processor, size, boxes)
    image_pos = encoded.groups["image"]
    if len(labels) != len(image_pos):
        raise MmflowError(f"{len(labels)} patch labels for {len(image_pos)} image tokens: processor and model disagree")
    return {
        "related_patches": [p for p, lab in zip(image_pos, labels.tolist()) if lab == RELATED],
        "other_patches": [p for p, lab in zip(image_pos, labels.tolist()) if lab == OTHER],
    }


# ----------------------------------------------------------------------------------------------------------
# Data: one Example type for the embedded shapes world and the paper's GQA CSVs
# ----------------------------------------------------------------------------------------------------------

#: Which CSV columns name the objects a task's question is about (the paper's choice of boxes).
OBJECT_PREFIXES = {
    "ChooseAttr": ("central object",),
    "ChooseCat": ("central object",),
    "QueryAttr": ("central object",),
    "ChooseRel": ("object1", "object2"),
    "CompareAttr": ("object1", "object2"),
    "LogicalObj": ("object1", "object2"),
}
CHOOSE_TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel")


@dataclass
class Example:
    """One question about one image, with the boxes of the objects it is about (original-image pixels)."""

    example_id: str
    task: str
    question: str
    answer: str
    image_size: tuple[int, int]  # (W, H)
    objects: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (x, y, w, h)
    true_option: str | None = None
    false_option: str | None = None
    image_path: str | None = None
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def options(self) -> tuple[str, ...]:
        """(true, false) options of a Choose question, else empty."""
        return (self.true_option, self.false_option) if self.true_option and self.false_option else ()

    def image(self) -> Image.Image:
        """The RGB image (loaded from ``image_path`` on demand)."""
        if self._image is not None:
            return self._image
        path = Path(str(self.image_path))
        if not path.is_file():
            raise MmflowError(f"Image of example {self.example_id} not found: {path}")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as err:
            raise MmflowError(f"Image of example {self.example_id} is not a readable image: {path} ({err})") from err


def _number(row: Mapping[str, Any], column: str, where: str) -> float | None:
    """A numeric CSV cell; None for an empty/'-'/None cell, a MmflowError naming the cell if malformed."""
    value = row.get(column)
    if value is None or str(value).strip() in ("", "-", "None", "nan"):
        return None
    try:
        return float(value)
    except ValueError as err:
        raise MmflowError(f"{where}: column '{column}' must be a number, got {value!r}") from err


def example_from_row(row: Mapping[str, Any], task: str, where: str, image_path: str | None = None,
                     image: Image.Image | None = None) -> Example:
    """Build an :class:`Example` from a row with the GQA CSV columns (shapes rows use the same names)."""
    if task not in OBJECT_PREFIXES:
        raise MmflowError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    for column in ("question_id", "question", "answer"):
        if not str(row.get(column) or "").strip():
            raise MmflowError(f"{where}: missing value in column '{column}'")
    width, height = _number(row, "image_w", where), _number(row, "image_h", where)
    if not width or not height:
        raise MmflowError(f"{where}: columns 'image_w' and 'image_h' must be positive numbers")
    objects, boxes = [], []
    for prefix in OBJECT_PREFIXES[task]:
        name = str(row.get(f"{prefix} name") or "").strip()
        if name:
            objects.append(name)
        coords = [_number(row, f"{prefix} {c}", where) for c in "xywh"]
        if all(c is not None for c in coords):
            boxes.append(tuple(coords))
        elif any(c is not None for c in coords):
            raise MmflowError(f"{where}: incomplete box for '{prefix}' ({dict(zip('xywh', coords))})")
    true_opt, false_opt = (str(row.get(c) or "").strip() or None for c in ("true option", "false option"))
    if task in CHOOSE_TASKS and not (true_opt and false_opt):
        raise MmflowError(f"{where}: a {task} question needs 'true option' and 'false option'")
    return Example(
        example_id=str(row["question_id"]), task=task, question=str(row["question"]).strip(),
        answer=str(row["answer"]).strip(), image_size=(int(width), int(height)), objects=objects, boxes=boxes,
        true_option=true_opt if task in CHOOSE_TASKS else None, false_option=false_opt if task in CHOOSE_TASKS else None,
        image_path=image_path, _image=image,
    )


def gqa_csv_path(csv_dir: str | Path, task: str) -> Path:
    """The paper's CSV of a task in ``csv_dir`` (file names end in ``_<Task>.csv``)."""
    matches = sorted(Path(csv_dir).glob(f"*_{task}.csv"))
    if len(matches) != 1:
        raise MmflowError(f"Expected one file '*_{task}.csv' in {csv_dir}, found {len(matches)}")
    return matches[0]


def load_gqa(csv_dir: str | Path, image_dir: str | Path, tasks: Sequence[str] = TASKS, n: int | None = None) -> list[Example]:
    """The first ``n`` questions per task from the paper's GQA CSVs, images from ``image_dir/<img_id>.jpg``.

    Malformed rows and missing images raise a :class:`MmflowError` naming the file, line and cell; nothing is
    dropped silently.
    """
    examples = []
    for task in tasks:
        path = gqa_csv_path(csv_dir, task)
        with path.open(newline="", encoding="utf-8") as handle:
            for i, row in enumerate(csv.DictReader(handle)):
                if n is not None and i >= n:
                    break
                where = f"{path.name} line {i + 2}"
                if None in row or any(v is None for v in row.values()):
                    raise MmflowError(f"{where}: wrong number of fields")
                image_path = Path(image_dir) / f"{str(row.get('img_id', '')).strip()}.jpg"
                if not image_path.is_file():
                    raise MmflowError(f"{where}: image {image_path} not found (GQA images go in {image_dir})")
                examples.append(example_from_row(row, task, where, image_path=str(image_path)))
    return examples


def load_shapes(n: int, seed: int | None = None, tasks: Sequence[str] = TASKS) -> list[Example]:
    """``n`` questions per task from the embedded shapes world (the fixed evaluation split by default)."""
    from shapes_world import world

    dataset = world.make_dataset(n, world.EVAL_SEED if seed is None else seed, tasks=tuple(tasks))
    return [example_from_row(row, row["task"], f"shapes row {i}", image=row["image"]) for i, row in enumerate(dataset)]


def load_examples(data: str = EMBEDDED_DATA, images: str | None = None, tasks: Sequence[str] = TASKS,
                  n: int | None = None, seed: int | None = None) -> list[Example]:
    """Examples from ``"shapes"`` (embedded) or a folder of the paper's GQA CSVs with ``images``."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MmflowError(f"Unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    if data == EMBEDDED_DATA:
        return load_shapes(n or 20, seed, tasks)
    if not Path(data).is_dir():
        raise MmflowError(f"Data folder {data} not found: pass 'shapes' or a folder of GQA CSVs")
    if not images:
        raise MmflowError("GQA data needs an image folder (IMAGES=... / images=...)")
    return load_gqa(data, images, tasks, n)


def encode_example(processor: Any, example: Example, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, model: Any = None) -> Encoded:
    """:func:`encode` an :class:`Example`; with ``model`` also its ``related_patches``/``other_patches``."""
    image = example.image()
    if image.size != tuple(example.image_size):
        raise MmflowError(f"Example {example.example_id}: image is {image.size}, the data says {example.image_size}")
    encoded = encode(processor, image, example.question, example.options, example.objects, device, dtype)
    if model is not None:
        encoded.groups.update(patch_groups(model, processor, encoded, example.image_size, example.boxes))
    return encoded


# ----------------------------------------------------------------------------------------------------------
# Attention knockout
# ----------------------------------------------------------------------------------------------------------

#: The paper's flows as (source group, target group): the target's attention to the source is blocked.
FLOWS = {
    "Question->Last": ("question", "last"),
    "Image->Last": ("image", "last"),
    "Last->Last": ("last", "last"),
    "Image->Question": ("image", "question"),
    "Related patches->Question": ("related_patches", "question"),
    "Other patches->Question": ("other_patches", "question"),
}
TO_LAST_FLOWS = ("Question->Last", "Image->Last", "Last->Last")
PATCH_FLOWS = ("Related patches->Question", "Other patches->Question")
ENGINES = ("fast", "naive")
_KNOCKOUT_IMPL = {"sdpa": "mmflow_knockout_sdpa", "eager": "mmflow_knockout_eager"}


def flow_parts(flow: str | tuple[Any, Any], groups: Mapping[str, Sequence[int]]) -> tuple[Any, Any]:
    """(source, target) of a flow, each a group name or positions: a name from :data:`FLOWS`, ``"group->group"``,
    or a pair."""
    if not isinstance(flow, str):
        return tuple(flow)
    if flow in FLOWS:
        return FLOWS[flow]
    if "->" in flow:
        return tuple(part.strip() for part in flow.split("->", 1))
    raise MmflowError(f"Unknown flow {flow!r}: use one of {list(FLOWS)} or 'source->target' with groups {sorted(groups)}")


def flow_positions(flow: str | tuple[Any, Any], groups: Mapping[str, Sequence[int]]) -> tuple[list[int], list[int]]:
    """(sources, targets) positions of a flow (see :func:`flow_parts`)."""
    parts = flow_parts(flow, groups)
    out = []
    for part in parts:
        if isinstance(part, str):
            if part not in groups:
                raise MmflowError(f"Unknown group {part!r} in flow {flow!r}; this example has {sorted(groups)}")
            out.append(sorted(groups[part]))
        else:
            out.append(sorted(int(p) for p in part))
    sources, targets = out
    if not sources or not targets:
        raise MmflowError(f"Flow {flow!r} has an empty group (sources {len(sources)}, targets {len(targets)})")
    for t in targets:  # a query row that keeps no key is undefined (NaN / uniform attention): refuse it
        if set(range(t + 1)) <= set(sources):
            raise MmflowError(f"Flow {flow!r} would block every key of position {t}")
    return sources, targets


def has_empty_group(flow: str | tuple[Any, Any], groups: Mapping[str, Sequence[int]]) -> bool:
    """True if a named flow's source or target group exists but is empty for this example (e.g. no related
    patches because the question's objects are not in the image)."""
    return any(isinstance(p, str) and p in groups and not groups[p] for p in flow_parts(flow, groups))


def window_layers(centre: int, k: int, n_layers: int) -> range:
    """The paper's window of ``k`` layers centred on ``centre``, truncated (not shifted) at the edges."""
    return range(max(0, centre - k // 2), min(n_layers, centre - (-k // 2)))


class Knockout:
    """Per-layer boolean block masks (True = cut the edge), broadcastable to (batch, heads, q_len, kv_len)."""

    def __init__(self, blocks: Mapping[int, torch.Tensor]):
        self.blocks = dict(blocks)

    def get(self, layer: int | None) -> torch.Tensor | None:
        """The block mask of ``layer`` (None if nothing is cut there)."""
        return self.blocks.get(layer)


def _merge_block(attention_mask: torch.Tensor | None, block: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Add cut edges to a mask as the model gave it: None (implicit lower-right causal), bool, or additive float."""
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=block.device).tril(kv_len - q_len)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~block
    return attention_mask.masked_fill(block, torch.finfo(attention_mask.dtype).min)


def _make_knockout_attention(base: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, knockout: Knockout | None = None, **kwargs):
        block = knockout.get(getattr(module, "layer_idx", None)) if knockout is not None else None
        if block is not None:
            attention_mask = _merge_block(attention_mask, block, query.shape[-2], key.shape[-2])
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_knockout_attention() -> None:
    """Register the knockout attention functions and their mask builders (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    for kind, base, mask_fn in (("sdpa", sdpa_attention_forward, sdpa_mask), ("eager", eager_attention_forward, eager_mask)):
        AttentionInterface.register(_KNOCKOUT_IMPL[kind], _make_knockout_attention(base))
        AttentionMaskInterface.register(_KNOCKOUT_IMPL[kind], mask_fn)  # without it every mask arrives as None


@contextlib.contextmanager
def knockout_attention(model: Any) -> Iterator[str]:
    """Route the language model's attention through the knockout function; restore it on exit, also on error.

    Yields the base implementation ("sdpa" or "eager") whose mask conventions apply.
    """
    _register_knockout_attention()
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    base = "eager" if previous == "eager" else "sdpa"
    model.set_attn_implementation({"text_config": _KNOCKOUT_IMPL[base]})
    try:
        yield base
    finally:
        model.set_attn_implementation({"text_config": previous})


def _block(edges: Iterable[tuple[Sequence[int], Sequence[int]]], q_len: int, kv_len: int, device: Any) -> torch.Tensor:
    """A (1, 1, q_len, kv_len) bool mask cutting every (query row, key column) of each (rows, cols) pair."""
    block = torch.zeros(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    for rows, cols in edges:
        block[0, 0, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    return block


@dataclass
class Clean:
    """The clean run of one example: the answer token, its probability and what the fast engine reuses."""

    answer_token: int
    p_base: float
    cache: Any = None
    embeds: torch.Tensor | None = None


def clean_run(model: Any, encoded: Encoded, keep_cache: bool = False) -> Clean:
    """One forward without knockout; the answer is the greedy first token at the last position."""
    out = model(**encoded.inputs, use_cache=keep_cache, output_hidden_states=keep_cache, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    answer = int(logits.argmax())
    p_base = float(torch.softmax(logits, -1)[answer])
    if keep_cache:
        return Clean(answer, p_base, out.past_key_values, out.hidden_states[0])
    return Clean(answer, p_base)


def _naive_sweep(model, encoded, sources, targets, windows, answer) -> list[float]:
    """The paper's method: one full forward (vision tower included) per window."""
    n = encoded.length
    block = _block([(targets, sources)], n, n, model.device)
    probs = []
    for layers in windows:
        out = model(**encoded.inputs, use_cache=False, logits_to_keep=1, knockout=Knockout({j: block for j in layers}))
        probs.append(float(torch.softmax(out.logits[0, -1].float(), -1)[answer]))
    return probs


def _crop_to(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _fast_sweep(model, clean: Clean, base: str, sources, targets, windows, answer, token_budget: int) -> list[float]:
    """Exact KV-reuse sweep: a knockout whose targets start at t0 changes nothing before t0, so the clean prefix
    K/V are reused and only the suffix [t0, N) is recomputed, for G windows at once laid out as G copies of the
    suffix along the sequence (same position ids; a 4D mask lets each copy see the prefix and itself only)."""
    n = clean.embeds.shape[1]
    t0 = min(targets)
    s = n - t0
    if clean.cache.get_seq_length() < t0:
        raise MmflowError(f"The clean cache holds {clean.cache.get_seq_length()} positions, fewer than t0={t0}: "
                          "it was cropped by an earlier sweep; pass a fresh clean_run")
    _crop_to(clean.cache, t0)
    suffix = clean.embeds[:, t0:]
    g_max = len(windows) if s == 1 else max(1, min(len(windows), token_budget // s))
    probs: list[float] = []
    for start in range(0, len(windows), g_max):
        chunk = windows[start:start + g_max]
        g = len(chunk)
        q_len, kv_len = g * s, t0 + g * s
        allowed = torch.zeros(1, 1, q_len, kv_len, dtype=torch.bool, device=suffix.device)
        allowed[..., :t0] = True
        causal = torch.ones(s, s, dtype=torch.bool, device=suffix.device).tril()
        rows_of, cols_of = [], []
        for w in range(g):
            allowed[0, 0, w * s:(w + 1) * s, t0 + w * s:t0 + (w + 1) * s] = causal
            rows_of.append([w * s + (t - t0) for t in targets])
            cols_of.append([c if c < t0 else t0 + w * s + (c - t0) for c in sources])
        blocks = {layer: _block([(rows_of[w], cols_of[w]) for w, layers in enumerate(chunk) if layer in layers],
                                q_len, kv_len, suffix.device)
                  for layer in sorted({j for layers in chunk for j in layers})}
        mask = allowed if base == "sdpa" else torch.zeros(allowed.shape, dtype=suffix.dtype, device=suffix.device).masked_fill(
            ~allowed, torch.finfo(suffix.dtype).min)
        out = model(
            inputs_embeds=suffix.repeat(1, g, 1),
            position_ids=(t0 + torch.arange(s, device=suffix.device)).repeat(g)[None],
            attention_mask=mask, past_key_values=clean.cache, use_cache=True,
            logits_to_keep=torch.arange(g, device=suffix.device) * s + s - 1, knockout=Knockout(blocks),
        )
        _crop_to(clean.cache, t0)
        probs.extend(torch.softmax(out.logits[0].float(), -1)[:, answer].tolist())
    return probs


def knockout_sweep(
    model: Any,
    encoded: Encoded,
    flows: Sequence[str | tuple[Any, Any]] = tuple(FLOWS),
    window: int = 9,
    engine: str = "fast",
    layers: Sequence[int] | None = None,
    token_budget: int = 256,
    example_id: str = "",
    clean: Clean | None = None,
) -> pd.DataFrame:
    """Knock out each flow in a window of ``window`` layers centred on every layer (or ``layers``).

    Returns one row per (flow, centre layer): ``example_id, flow, layer, window_start, window_end, k,
    answer_token, p_base, p_new, rel_change`` with ``rel_change = (p_new - p_base) / p_base * 100``; p is the
    probability of the model's own greedy first answer token. ``engine="naive"`` runs one full forward per window
    (the paper's method); ``"fast"`` reuses the clean KV cache and batches windows, with the same results.
    ``clean`` is a :func:`clean_run` to reuse (with ``keep_cache=True`` for the fast engine).
    """
    if engine not in ENGINES:
        raise MmflowError(f"Unknown engine {engine!r}; use one of {ENGINES}")
    n_layers = num_layers(model)
    centres = list(range(n_layers)) if layers is None else list(layers)
    windows = [window_layers(c, window, n_layers) for c in centres]
    resolved = [(flow if isinstance(flow, str) else "->".join(map(str, flow)), flow_positions(flow, encoded.groups))
                for flow in flows]
    rows = []
    with torch.inference_mode(), knockout_attention(model) as base:
        clean = clean or clean_run(model, encoded, keep_cache=engine == "fast")
        # crops only ever shrink the cache: process flows by decreasing first target
        for name, (sources, targets) in sorted(resolved, key=lambda item: -min(item[1][1])):
            if engine == "fast":
                probs = _fast_sweep(model, clean, base, sources, targets, windows, clean.answer_token, token_budget)
            else:
                probs = _naive_sweep(model, encoded, sources, targets, windows, clean.answer_token)
            for centre, layers_, p_new in zip(centres, windows, probs):
                rows.append({
                    "example_id": example_id, "flow": name, "layer": centre, "window_start": layers_.start,
                    "window_end": layers_.stop - 1, "k": window, "answer_token": clean.answer_token,
                    "p_base": clean.p_base, "p_new": p_new, "rel_change": (p_new - clean.p_base) / clean.p_base * 100,
                })
    order = {name: i for i, (name, _) in enumerate(resolved)}
    return pd.DataFrame(rows).sort_values(["flow", "layer"], key=lambda col: col.map(order) if col.name == "flow" else col,
                                          ignore_index=True)


# ----------------------------------------------------------------------------------------------------------
# Logit lens
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_layer_outputs(model: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the residual stream after every decoder layer (forward hooks, always removed on exit)."""
    outputs: list[torch.Tensor] = []

    def hook(_module, _args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def logit_lens(model: Any, encoded: Encoded, tokens: Mapping[str, int], final_norm: bool = True) -> pd.DataFrame:
    """Probability of each named token at the last position, read off the residual stream after every layer.

    Each layer's output is unembedded with the LM head, after the final norm by default (``final_norm=False``
    reproduces the paper's code). Columns: ``layer, token, token_id, prob``.
    """
    norm = text_model(model).norm
    head = model.get_output_embeddings()
    rows = []
    with torch.inference_mode(), capture_layer_outputs(model) as outputs:
        model(**encoded.inputs, use_cache=False, logits_to_keep=1)
        for layer, hidden in enumerate(outputs):
            h = hidden[:, -1]
            probs = torch.softmax(head(norm(h) if final_norm else h)[0].float(), -1)
            rows.extend({"layer": layer, "token": name, "token_id": tid, "prob": float(probs[tid])}
                        for name, tid in tokens.items())
    return pd.DataFrame(rows)


def answer_token_ids(tokenizer: Any, word: str) -> dict[str, int]:
    """First token of ``word`` in lowercase and Capitalized form, as the model would emit it after the prompt."""
    out = {}
    for name, form in (("lowercase", word.lower()), ("Capitalized", word.capitalize())):
        ids = tokenizer(" " + form, add_special_tokens=False)["input_ids"]
        bare = tokenizer(form, add_special_tokens=False)["input_ids"]
        out[name] = ids[0] if tokenizer.decode(ids[:1]).strip() else bare[0]
    return out


# ----------------------------------------------------------------------------------------------------------
# Experiments over many examples: correctness filter, on-disk cache keyed by configuration, shards
# ----------------------------------------------------------------------------------------------------------


def default_window(n_layers: int) -> int:
    """The paper's k=9 for 32-40-layer models; about L/4 (odd, so it has a centre) for shallower ones."""
    return min(9, 2 * round(n_layers / 8) + 1)


def greedy_answer(model: Any, processor: Any, encoded: Encoded, max_new_tokens: int = 10) -> str:
    """The model's own greedy answer (clean run), decoded without special tokens."""
    with torch.inference_mode():
        out = model.generate(**encoded.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, encoded.length:], skip_special_tokens=True)


def is_correct(predicted: str, gold: str) -> bool:
    """The paper's filter: the whole answer, stripped and lower-cased, equals the gold answer."""
    return predicted.strip().rstrip(".").strip().lower() == gold.strip().lower()


def model_fingerprint(model: Any, name: str) -> str:
    """Identify a model for cache keys: its name, config and a checksum of its weights."""
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    return f"{name}|{model.config.to_json_string(use_diff=False)}|{checksum:.10e}"


def config_key(**config: Any) -> str:
    """A short stable hash of a configuration (the cache folder of its results)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_of(items: Sequence[Any], shard: tuple[int, int] = (0, 1)) -> list[Any]:
    """Items of shard ``i`` of ``n`` (round robin), so ``n`` processes split a run without overlap."""
    i, n = shard
    if not 0 <= i < n:
        raise MmflowError(f"Shard {i} of {n} does not exist")
    return list(items[i::n])


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)  # never a half-written result


def run_cached(
    examples: Sequence[Example],
    compute: Callable[[Example], dict[str, Any]],
    cache_dir: str | Path,
    key: str,
    shard: tuple[int, int] = (0, 1),
    desc: str = "examples",
) -> list[dict[str, Any]]:
    """Run ``compute`` on each example of the shard, caching each result as ``cache_dir/key/<example_id>.json``.

    Cached examples are skipped, so an interrupted run resumes where it stopped and gives identical results.
    Returns this shard's results; :func:`merge_cached` collects all shards.
    """
    from tqdm.auto import tqdm

    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for example in tqdm(shard_of(examples, shard), desc=desc, leave=False):
        path = folder / f"{example.example_id}.json"
        if not path.exists():
            _write_json_atomic(path, compute(example))
        results.append(json.loads(path.read_text()))
    return results


def merge_cached(cache_dir: str | Path, key: str, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """All cached results of a configuration, in example order; names the examples no shard has computed yet."""
    folder = Path(cache_dir) / key
    missing = [e.example_id for e in examples if not (folder / f"{e.example_id}.json").exists()]
    if missing:
        raise MmflowError(f"{len(missing)} examples not computed yet in {folder} (e.g. {missing[:3]}): run the missing shards")
    return [json.loads((folder / f"{e.example_id}.json").read_text()) for e in examples]


@dataclass
class Run:
    """A loaded model with its processor and the settings every experiment on it shares."""

    name: str
    model: Any
    processor: Any
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str = str(REPO_DIR / "results")
    fingerprint: str = ""

    @classmethod
    def load(cls, name: str = EMBEDDED_MODEL, device: str = "cpu", dtype: str = "float32",
             cache_dir: str | None = None) -> Run:
        """Load a model (see :func:`load_model`) and fingerprint it for the cache."""
        torch.manual_seed(0)
        model, processor = load_model(name, device, dtype)
        return cls(name, model, processor, device, dtype, cache_dir or str(REPO_DIR / "results"),
                   model_fingerprint(model, name))

    def encode(self, example: Example, patches: bool = False) -> Encoded:
        """Encode an example for this model (with its patch groups if ``patches``)."""
        return encode_example(self.processor, example, self.device, getattr(torch, self.dtype),
                              self.model if patches else None)

    def _check(self, example: Example, encoded: Encoded) -> dict[str, Any]:
        predicted = greedy_answer(self.model, self.processor, encoded)
        return {"example_id": example.example_id, "task": example.task, "answer": example.answer,
                "predicted": predicted.strip(), "correct": is_correct(predicted, example.answer)}

    def knockout(self, examples: Sequence[Example], flows: Sequence[str], window: int, engine: str = "fast",
                 shard: tuple[int, int] = (0, 1), data_id: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
        """Knockout sweeps over correctly answered examples: (rows of the kept examples, per-example status)."""
        key = config_key(kind="knockout", model=self.fingerprint, data=data_id, flows=list(flows), window=window,
                         engine=engine, dtype=self.dtype)
        patches = any(f in PATCH_FLOWS or "patches" in f for f in flows)

        def compute(example: Example) -> dict[str, Any]:
            encoded = self.encode(example, patches)
            status = self._check(example, encoded)
            skipped = [f for f in flows if has_empty_group(f, encoded.groups)]
            rows = []
            if status["correct"] and len(skipped) < len(flows):
                usable = [f for f in flows if f not in skipped]
                rows = knockout_sweep(self.model, encoded, usable, window, engine, example_id=example.example_id)
                rows = rows.assign(task=example.task).to_dict("records")
            return {**status, "skipped_flows": skipped, "rows": rows}

        run_cached(examples, compute, self.cache_dir, key, shard, desc="knockout")
        return self._frames(examples, key, shard)

    def lens(self, examples: Sequence[Example], shard: tuple[int, int] = (0, 1), data_id: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
        """Logit lens (with and without final norm) for the lowercase/Capitalized answer and false option."""
        key = config_key(kind="lens", model=self.fingerprint, data=data_id, dtype=self.dtype)
        tok = self.processor.tokenizer

        def compute(example: Example) -> dict[str, Any]:
            encoded = self.encode(example)
            status = self._check(example, encoded)
            rows = []
            if status["correct"]:
                tokens = {f"answer ({form})": tid for form, tid in answer_token_ids(tok, example.answer).items()}
                if example.false_option:
                    tokens.update({f"false option ({form})": tid
                                   for form, tid in answer_token_ids(tok, example.false_option).items()})
                for final_norm in (True, False):
                    frame = logit_lens(self.model, encoded, tokens, final_norm)
                    rows += frame.assign(final_norm=final_norm, example_id=example.example_id,
                                         task=example.task).to_dict("records")
            return {**status, "rows": rows}

        run_cached(examples, compute, self.cache_dir, key, shard, desc="logit lens")
        return self._frames(examples, key, shard)

    def _frames(self, examples: Sequence[Example], key: str, shard: tuple[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
        results = merge_cached(self.cache_dir, key, shard_of(examples, shard))
        status = pd.DataFrame([{k: v for k, v in r.items() if k != "rows"} for r in results])
        rows = pd.DataFrame([row for r in results for row in r["rows"]])
        return rows, status


def accuracy_table(status: pd.DataFrame) -> pd.DataFrame:
    """Per task: examples, correctly answered (kept), accuracy."""
    table = status.groupby("task").correct.agg(examples="size", kept="sum")
    table["accuracy"] = table.kept / table.examples
    return table


# ----------------------------------------------------------------------------------------------------------
# Figures: curve tables with confidence bands, PNG + PDF + CSV, computed captions
# ----------------------------------------------------------------------------------------------------------


def curve_table(rows: pd.DataFrame, value: str = "rel_change", by: Sequence[str] = ("task", "flow", "layer")) -> pd.DataFrame:
    """Mean of ``value`` over examples with a 95% normal confidence band, per ``by`` group."""
    grouped = rows.groupby(list(by), sort=False)[value]
    table = grouped.agg(mean="mean", std="std", n="size").reset_index()
    half = 1.96 * table["std"].fillna(0.0) / np.sqrt(table["n"])
    return table.assign(ci_low=table["mean"] - half, ci_high=table["mean"] + half).drop(columns="std")


def plot_curves(table: pd.DataFrame, panel: str = "task", line: str = "flow", x: str = "layer",
                ylabel: str = "% change in answer probability", title: str = "", ncols: int = 3) -> Any:
    """One panel per ``panel`` value, one line (mean with its band) per ``line`` value."""
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(table[panel]))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(panels)), figsize=(4.2 * min(ncols, len(panels)), 3.2 * nrows),
                             squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, panels):
        part = table[table[panel] == name]
        for label, curve in part.groupby(line, sort=False):
            ax.plot(curve[x], curve["mean"], marker=".", label=label)
            ax.fill_between(curve[x], curve["ci_low"], curve["ci_high"], alpha=0.2)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{name} (n={int(part['n'].max())})", fontsize=10)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, data: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name``.png, .pdf and the figure's data as .csv (fixed precision, so reruns give identical files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    data.to_csv(paths[2], index=False, float_format="%.6f")
    return paths


def largest_drop(table: pd.DataFrame, **where: Any) -> tuple[int, float]:
    """(layer, mean % change) of the most negative point of a curve selected by column values."""
    part = table
    for column, value in where.items():
        part = part[part[column] == value]
    row = part.loc[part["mean"].idxmin()]
    return int(row["layer"]), float(row["mean"])


def describe_curves(table: pd.DataFrame, flows: Sequence[str], n_layers: int) -> str:
    """One computed sentence per flow: where its mean over tasks drops most, and in which third of the model."""
    overall = table.groupby(["flow", "layer"], sort=False)["mean"].mean().reset_index()
    lines = []
    for flow in flows:
        layer, value = largest_drop(overall, flow=flow)
        third = ("lower", "middle", "upper")[min(2, 3 * layer // n_layers)]
        lines.append(f"- {flow}: most negative mean change {value:+.1f}% at layer {layer} ({third} layers)")
    return "\n".join(lines)


def base_patch_grid(run: Run, example: Example) -> tuple[np.ndarray, np.ndarray]:
    """(processed base image as HxWx3 uint8, labels of its patch grid) — what the overlays show."""
    from transformers.image_utils import PILImageResampling

    labels = image_token_labels(run.model, run.processor, example.image_size, example.boxes)
    side = run.model.config.vision_config.image_size // run.model.config.vision_config.patch_size
    grid = labels[labels != NEITHER][: side * side].view(side, side).numpy()
    pixels = run.processor.image_processor(example.image(), do_rescale=False, do_normalize=False,
                                           resample=PILImageResampling.BICUBIC, return_tensors="pt")["pixel_values"][0]
    base = pixels if pixels.dim() == 3 else pixels[0]
    return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid


def plot_patch_overlay(run: Run, example: Example, ax: Any = None) -> Any:
    """The model's view of an example's image with related (red) and other (blue) patches overlaid."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image, grid = base_patch_grid(run, example)
    ax = ax or plt.subplots(figsize=(3.5, 3.5))[1]
    ax.imshow(image)
    cell = image.shape[0] / grid.shape[0]
    for (r, c), label in np.ndenumerate(grid):
        color = "red" if label == RELATED else "tab:blue"
        ax.add_patch(Rectangle((c * cell, r * cell), cell, cell, facecolor=color, alpha=0.35 if label == RELATED else 0.12,
                               edgecolor=color, lw=0.5))
    title = textwrap.fill(f"{example.task}: {example.question}", 45)
    ax.set_title(f"{title}\n(answer: {example.answer}; red = related patches)", fontsize=8)
    ax.axis("off")
    return ax


# ----------------------------------------------------------------------------------------------------------
# Widgets: explore layer windows on the fly (fast engine); static output under papermill
# ----------------------------------------------------------------------------------------------------------


class KnockoutExplorer:
    """An ipywidgets panel: window size, layer range, flow, task and example pickers, re-running the fast
    knockout for the chosen setting and redrawing the curve and the example's patch groups."""

    def __init__(self, run: Run, examples: Sequence[Example], flows: Sequence[str], window: int):
        import ipywidgets as widgets

        self.run, self.examples = run, list(examples)
        n_layers = num_layers(run.model)
        tasks = list(dict.fromkeys(e.task for e in self.examples))
        self.window = widgets.IntSlider(value=window, min=1, max=n_layers, description="window k")
        self.layers = widgets.IntRangeSlider(value=(0, n_layers - 1), min=0, max=n_layers - 1, description="centres")
        self.flow = widgets.Dropdown(options=list(flows), value=flows[0], description="flow")
        self.task = widgets.Dropdown(options=tasks, value=tasks[0], description="task")
        self.example = widgets.Dropdown(description="example")
        self.output = widgets.Output()
        self.result: pd.DataFrame | None = None
        self._sync_examples()
        self.task.observe(lambda _: self._sync_examples(), names="value")
        for control in (self.window, self.layers, self.flow, self.example):
            control.observe(lambda _: self.update(), names="value")
        self.panel = widgets.VBox([widgets.HBox([self.window, self.layers]),
                                   widgets.HBox([self.flow, self.task, self.example]), self.output])

    def _sync_examples(self) -> None:
        options = [(f"{e.example_id}: {e.question}", i) for i, e in enumerate(self.examples) if e.task == self.task.value]
        self.example.options = options
        self.example.value = options[0][1]

    def update(self) -> pd.DataFrame:
        """Re-run the knockout for the current setting and redraw; returns the sweep's rows."""
        example = self.examples[self.example.value]
        encoded = self.run.encode(example, patches=True)
        lo, hi = self.layers.value
        self.result = knockout_sweep(self.run.model, encoded, [self.flow.value], self.window.value, "fast",
                                     layers=range(lo, hi + 1), example_id=example.example_id)
        self.output.clear_output(wait=True)
        with self.output:
            self.figure(example)
        return self.result

    def figure(self, example: Example) -> Any:
        """The current setting's figure: the example's patch groups and the knockout curve."""
        import matplotlib.pyplot as plt

        fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(9, 3.4))
        plot_patch_overlay(self.run, example, ax_img)
        ax_curve.plot(self.result["layer"], self.result["rel_change"], marker="o")
        ax_curve.axhline(0, color="grey", lw=0.6)
        ax_curve.set(xlabel="centre layer", ylabel="% change in answer probability",
                     title=f"{self.flow.value}, k={self.window.value}")
        fig.tight_layout()
        plt.show()
        return fig

    def show(self) -> None:
        """Display the panel in a live frontend; headless (papermill, nbconvert) show the first setting statically."""
        from IPython.display import display

        if interactive_frontend():
            display(self.panel)
            self.update()
        else:
            self.update()
            self.figure(self.examples[self.example.value])


def interactive_frontend() -> bool:
    """True in a kernel started by a Jupyter server (JupyterLab/Notebook) or VS Code, False under papermill."""
    return any(name in os.environ for name in ("JPY_SESSION_NAME", "VSCODE_PID"))
