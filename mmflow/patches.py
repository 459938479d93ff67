"""Patch geometry: which image tokens show the question's objects (``related``) and which do not (``other``).

A box mask goes through the processor's own image preprocessing and, for anyres families, the model's own
feature packing, so labels line up with the image tokens by construction, whatever the geometry.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from mmflow.errors import MmflowError
from mmflow.models import LlavaModel, family_of, pack_image_features, token_pool, view_options

#: Labels of image tokens: the patch overlaps a box, does not, or is no patch (CLS, row-newline token).
RELATED, OTHER, NEITHER = 1.0, 0.0, -1.0

Box = tuple[float, float, float, float]  # (x, y, w, h) in original-image pixels


def box_mask(size: tuple[int, int], boxes: Iterable[Sequence[float]]) -> Image.Image:
    """An RGB mask of an image of ``size`` (W, H): boxes ``(x, y, w, h)`` red, everything else green.

    Example:
        >>> np.asarray(box_mask((4, 2), [(1, 0, 2, 1)]))[:, :, 0].tolist()
        [[0, 255, 255, 0], [0, 0, 0, 0]]
    """
    mask = Image.new("RGB", size, (0, 255, 0))
    pixels = np.asarray(mask).copy()
    for x, y, w, h in boxes:
        x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
        x1, y1 = min(size[0], math.ceil(x + w)), min(size[1], math.ceil(y + h))
        pixels[y0:y1, x0:x1] = (255, 0, 0)
    return Image.fromarray(pixels)


def mean_color(processor) -> tuple[int, ...]:
    """The processor's mean pixel as 0-255 RGB: the colour the official LLaVA code pads images with."""
    return tuple(int(x * 255) for x in processor.image_processor.image_mean)


def expand2square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Pad an image to a square with ``color``, the image centred (the official LLaVA ``expand2square``).

    Example:
        >>> padded = expand2square(Image.new("RGB", (4, 2), (255, 0, 0)), (0, 0, 0))
        >>> padded.size, padded.getpixel((0, 0)), padded.getpixel((0, 1))
        ((4, 4), (0, 0, 0), (255, 0, 0))
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def paper_pads(model_or_config) -> bool:
    """True if the paper's inputs pad this model's images to a square first (LLaVA-1.5's ``expand2square``).

    Anyres families (LLaVA-NeXT) tile the image as the processor does, which is the official anyres procedure;
    Qwen2-VL / Qwen2.5-VL resize it to whole 28 px cells (``smart_resize``), which is their official procedure.
    """
    return family_of(model_or_config).paper_pads


def model_view(image: Image.Image, processor, model_or_config, inputs: str) -> Image.Image:
    """The image as the chosen inputs hand it to the processor: padded to a square with the mean colour for the
    paper's single-tile inputs, unchanged otherwise."""
    return expand2square(image, mean_color(processor)) if inputs == "paper" and paper_pads(model_or_config) else image


def _patch_labels(tile: torch.Tensor, patch: int) -> torch.Tensor:
    """Per ViT patch (row-major) of one processed (3, H, W) mask tile: RELATED if any pixel is red."""
    red = (tile[0] - tile[1]) > 127
    h, w = red.shape[0] // patch, red.shape[1] // patch
    cells = red[: h * patch, : w * patch].reshape(h, patch, w, patch).any(dim=3).any(dim=1)
    return torch.where(cells.flatten(), RELATED, OTHER)


def image_token_labels(
    model: LlavaModel, processor, size: tuple[int, int], boxes: Iterable[Sequence[float]], inputs: str = "processor"
) -> torch.Tensor:
    """Label of every image token of an image of ``size`` (W, H): RELATED, OTHER, or NEITHER (CLS, newline).

    The box mask goes through the processor's own image geometry (resize, crop, pad, anyres tiling, Qwen's
    smart_resize into 28 px cells, with nearest-neighbour resampling and no normalisation) and, for anyres families,
    the model's own feature packing (unpadding, newline tokens, and OneVision's bilinear downsampling of large grids,
    after which a token is RELATED if any related patch contributes to it).

    Returns:
        A float tensor of shape ``(n_image_tokens,)``.
    """
    from transformers.image_utils import PILImageResampling

    mask = model_view(box_mask(size, boxes), processor, model, inputs)  # padding is mean colour: "other"
    pixels = _processed(
        processor, model, mask, resample=PILImageResampling.NEAREST, do_rescale=False, do_normalize=False
    )
    cfg = model.config
    patch = cfg.vision_config.patch_size
    if family_of(model).pixel_layout == "merged_patches":
        return _merged_labels(pixels["pixel_values"], processor.image_processor)
    tiles = pixels["pixel_values"] if family_of(model).processor_views else pixels["pixel_values"][0]  # (views, ...)
    if tiles.dim() == 3:
        tiles = tiles[None]
    per_tile = torch.stack([_patch_labels(tile, patch) for tile in tiles])  # (n_tiles, patches)
    if token_pool(model) > 1:  # Gemma 3: a token averages k x k patches (related if any is); each view in order
        return torch.cat([_pooled_labels(labels, token_pool(model)) for labels in per_tile])
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    cls_kept = strategy == "full" and any(hasattr(m, "class_embedding") for m in model.modules())  # CLIP, not SigLIP
    pack = pack_image_features(model)
    if "image_sizes" in pixels and pack is not None:  # anyres: pack the labels exactly like image features
        if cls_kept:
            raise MmflowError(f"Anyres patch groups need vision_feature_select_strategy='default', not {strategy!r}")
        if "vision_aspect_ratio" in inspect.signature(pack).parameters:  # OneVision: may downsample (bilinear)
            options = {"vision_aspect_ratio": cfg.vision_aspect_ratio}
        else:
            options = {"vision_feature_select_strategy": strategy}
        packed, _ = pack([per_tile[..., None]], pixels["image_sizes"], image_newline=torch.tensor([NEITHER]), **options)
        labels = packed[0][:, 0]  # a downsampled token is related if any related patch contributes to it
        return torch.where(labels == NEITHER, NEITHER, torch.where(labels > OTHER, RELATED, OTHER))
    labels = per_tile[0]
    return torch.cat([torch.tensor([NEITHER]), labels]) if cls_kept else labels


def _processed(processor, model: LlavaModel, image: Image.Image, **options) -> dict:
    """The image processor's tensors for ``image`` (``options`` for it: resampling, no rescaling). Where the processor
    call decides an image's views (Gemma 3's pan-and-scan crops), through that call with the checkpoint's
    :func:`~mmflow.families.view_options`, as :func:`~mmflow.inputs.encode` makes it: the views the model sees."""
    if family_of(model).processor_views:
        views = view_options(processor, model)
        return processor(images=image, text=processor.image_token, return_tensors="pt", **views, **options)
    return processor.image_processor(image, return_tensors="pt", **options)


def _pooled_labels(labels: torch.Tensor, kernel: int) -> torch.Tensor:
    """Labels of the tokens of a square patch grid average-pooled ``kernel`` x ``kernel`` (row-major, as the
    projector's ``AvgPool2d`` and flatten order them): RELATED if any of its patches is."""
    side = math.isqrt(len(labels))
    grid = labels.view(side // kernel, kernel, side // kernel, kernel)
    return torch.where((grid == RELATED).any(3).any(1).flatten(), RELATED, OTHER)


def _merged_labels(rows: torch.Tensor, image_processor) -> torch.Tensor:
    """Labels of the image tokens of one image in the Qwen layout: ``rows`` holds one flattened 14 px patch per row
    ``(C, temporal, patch, patch)``, ``merge_size**2`` consecutive rows per image token (a 28 px cell), in the
    order of the tokens; a token is RELATED if any pixel of its cell is red."""
    merge, patch = image_processor.merge_size, image_processor.patch_size
    pixels = rows.reshape(-1, merge * merge, 3, image_processor.temporal_patch_size, patch, patch)
    red = ((pixels[:, :, 0] - pixels[:, :, 1]) > 127).flatten(1).any(1)
    return torch.where(red, RELATED, OTHER)


def _unpatchify(rows: torch.Tensor, grid_thw: Sequence[int], image_processor) -> torch.Tensor:
    """The (3, H, W) image of one image's rows in the Qwen layout (the inverse of its processor's patchify)."""
    _, grid_h, grid_w = (int(x) for x in grid_thw)
    merge, patch = image_processor.merge_size, image_processor.patch_size
    t = image_processor.temporal_patch_size
    x = rows.reshape(grid_h // merge, grid_w // merge, merge, merge, 3, t, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)


def patch_groups(
    model: LlavaModel,
    processor,
    image_positions: Sequence[int],
    size: tuple[int, int],
    boxes: Sequence[Sequence[float]],
    inputs: str = "processor",
) -> dict[str, list[int]]:
    """``related_patches`` / ``other_patches``: image-token positions whose patch overlaps any box, or none. Where
    the model sees the image in several views (Gemma 3 with pan-and-scan) these are the union, and each view is also
    its own pair of groups: ``related_patches@original``, ``other_patches@original``, ``related_patches@crop1``, ...

    Args:
        image_positions: positions of the image tokens in the language model's sequence.
        size: the original image's (W, H).
        boxes: the question's object boxes ``(x, y, w, h)`` in original-image pixels.
        inputs: ``"paper"`` or ``"processor"``: the geometry the image went through (see :func:`model_view`).

    Raises:
        MmflowError: if the processor and the model disagree on the number of image tokens.
    """
    labels = image_token_labels(model, processor, size, boxes, inputs)
    if len(labels) != len(image_positions):
        raise MmflowError(
            f"{len(labels)} patch labels for {len(image_positions)} image tokens: processor and model disagree"
        )
    groups = _split(image_positions, labels, "")
    if family_of(model).processor_views:  # Gemma 3 with pan-and-scan crops: also one pair of groups per view
        groups.update(_view_groups(model, image_positions, labels))
    return groups


def _view_groups(model: LlavaModel, positions: Sequence[int], labels: torch.Tensor) -> dict[str, list[int]]:
    """``related_patches@original`` / ``other_patches@original``, ``...@crop1``, ...: the patch groups of each view
    (consecutive runs of one view's tokens, the original first); none when the model sees one view."""
    vision = model.config.vision_config
    per_view = (vision.image_size // vision.patch_size // token_pool(model)) ** 2
    groups: dict[str, list[int]] = {}
    for v in range(len(labels) // per_view if len(labels) > per_view else 0):
        part = slice(v * per_view, (v + 1) * per_view)
        groups.update(_split(positions[part], labels[part], "@original" if v == 0 else f"@crop{v}"))
    return groups


def _split(positions: Sequence[int], labels: torch.Tensor, suffix: str) -> dict[str, list[int]]:
    """``related_patches<suffix>`` / ``other_patches<suffix>``: the positions labelled RELATED / OTHER."""
    return {
        f"related_patches{suffix}": [p for p, lab in zip(positions, labels.tolist()) if lab == RELATED],
        f"other_patches{suffix}": [p for p, lab in zip(positions, labels.tolist()) if lab == OTHER],
    }


def base_patch_grid(
    model: LlavaModel, processor, image: Image.Image, boxes: Sequence[Sequence[float]], inputs: str = "processor"
) -> tuple[np.ndarray, np.ndarray]:
    """(processed base tile as HxWx3 uint8, labels of its patch grid): what the overlays show."""
    from transformers.image_utils import PILImageResampling

    labels = image_token_labels(model, processor, image.size, boxes, inputs)
    image = model_view(image, processor, model, inputs)
    processed = _processed(
        processor, model, image, do_rescale=False, do_normalize=False, resample=PILImageResampling.BICUBIC
    )
    if family_of(model).pixel_layout == "merged_patches":  # one image, one token per 28 px cell
        base = _unpatchify(processed["pixel_values"], processed["image_grid_thw"][0], processor.image_processor)
        merge = processor.image_processor.merge_size
        _, grid_h, grid_w = (int(x) for x in processed["image_grid_thw"][0])
        grid = labels.view(grid_h // merge, grid_w // merge).numpy()
        return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size // token_pool(model)
    grid = labels[labels != NEITHER][: side * side].view(side, side).numpy()
    pixels = processed["pixel_values"][0]
    base = pixels if pixels.dim() == 3 else pixels[0]
    return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
