"""Patch geometry: which image tokens show the question's objects (``related``) and which do not (``other``).

A box mask goes through the processor's own image preprocessing and, for anyres families, the model's own
feature packing, so labels line up with the image tokens by construction, whatever the geometry.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from functools import reduce

import numpy as np
import torch
from PIL import Image

from mmflow.errors import MmflowError
from mmflow.models import LlavaModel, family_of, pack_image_features, sequence_shuffle, token_pool, view_options

#: Labels of image tokens: the patch overlaps a box, does not, or is no patch (CLS, row-newline token).
RELATED, OTHER, NEITHER = 1.0, 0.0, -1.0

Box = tuple[float, float, float, float]  # (x, y, w, h) in original-image pixels


def box_mask(size: tuple[int, int], boxes: Iterable[Sequence[float]]) -> Image.Image:
    """An RGB mask of an image of ``size`` (W, H): boxes ``(x, y, w, h)`` red, everything else green.

    A box marks the pixels it covers inside the image, and only those: the part past any edge is clipped, so a box
    at negative coordinates or past the far edge marks nothing outside it (never a slice counted from the far end).
    Which boxes the data may hold is :func:`mmflow.images.box_issues`'s rule.

    Example:
        >>> np.asarray(box_mask((4, 2), [(1, 0, 2, 1)]))[:, :, 0].tolist()
        [[0, 255, 255, 0], [0, 0, 0, 0]]
        >>> int(np.asarray(box_mask((64, 48), [(-30, -30, 10, 12)]))[:, :, 0].sum())
        0
    """
    mask = Image.new("RGB", size, (0, 255, 0))
    pixels = np.asarray(mask).copy()
    width, height = size
    for x, y, w, h in boxes:
        x0, y0 = min(width, max(0, math.floor(x))), min(height, max(0, math.floor(y)))
        x1, y1 = max(x0, min(width, math.ceil(x + w))), max(y0, min(height, math.ceil(y + h)))
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
    Qwen2-VL / Qwen2.5-VL resize it to whole 28 px cells (``smart_resize``; Qwen3-VL 32 px cells), which is their
    official procedure.
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
    smart_resize into 28 px cells (Qwen3-VL 32 px), InternVL's dynamic tiles and thumbnail, Pixtral's
    aspect-preserving resize into 16 or 28 px cells, Gemma 3's squash and pan-and-scan crops, Idefics3's tiles and
    global image, with nearest-neighbour
    resampling and no normalisation) and, for anyres families, the model's own feature packing (unpadding, newline
    tokens, and OneVision's bilinear downsampling of large grids, after which a token is RELATED if any related patch
    contributes to it), for InternVL the model's own pixel shuffle (a token is RELATED if any of its 2 x 2 patches
    is), for Gemma 3 the projector's average pooling (likewise, per k x k patches), for Idefics3 the connector's
    pixel shuffle over each tile's patch sequence (likewise, per scale x scale patches).

    Returns:
        A float tensor of shape ``(n_image_tokens,)``.
    """
    return _labels_and_views(model, processor, size, boxes, inputs)[0]


def _processed_mask(model: LlavaModel, processor, size, boxes, inputs: str) -> dict:
    """The box mask as the processor prepares it for the model (:func:`_processed`), nearest-neighbour."""
    from transformers.image_utils import PILImageResampling

    mask = model_view(box_mask(size, boxes), processor, model, inputs)  # padding is mean colour: "other"
    return _processed(model, processor, mask, PILImageResampling.NEAREST)


def _processed(model: LlavaModel, processor, image: Image.Image, resample) -> dict:
    """``image`` through the processor's image processor with the options the processor call itself passes
    (:func:`_image_options`: InternVL's ``crop_to_patches``, Gemma 3's pan-and-scan, ...), so in the views the model
    sees, resampled with ``resample``, not rescaled or normalised."""
    options = {**_image_options(model, processor), "resample": resample}
    return processor.image_processor(image, do_rescale=False, do_normalize=False, return_tensors="pt", **options)


def _labels_and_views(model: LlavaModel, processor, size, boxes, inputs: str) -> tuple[torch.Tensor, list[str]]:
    """:func:`image_token_labels` and the view of each token (:func:`_view_names`; all ``""`` for an image seen in
    one view)."""
    pixels = _processed_mask(model, processor, size, boxes, inputs)
    cfg, family = model.config, family_of(model)
    patch = _side(cfg.vision_config.patch_size)
    if family.pixel_layout == "merged_patches":
        labels = _merged_labels(pixels["pixel_values"], processor.image_processor)
        return labels, [""] * len(labels)
    if family.pixel_layout == "native":  # one image at its own aspect ratio, one token per cell
        labels = _patch_labels(pixels["pixel_values"][0], native_cell(model, processor))
        return labels, [""] * len(labels)
    values = pixels["pixel_values"]  # (1, tiles, 3, H, W) for anyres; (tiles or views, 3, H, W) otherwise
    tiles = values[0] if values.dim() == 5 else values
    per_tile = torch.stack([_patch_labels(tile, patch) for tile in tiles])  # (n_tiles, patches)
    if family.sequence_shuffle:  # Idefics3 (no vision_feature_select_strategy): the connector's pixel shuffle
        return _sequence_shuffled(model, per_tile)
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if family.pixel_shuffle or family.token_pool:  # the model folds each tile's patch grid into fewer tokens
        if family.pixel_shuffle:
            folded = _shuffled_labels(model, per_tile, strategy)
        else:
            folded = _pooled_labels(per_tile, token_pool(model))
        views = _view_names(family, len(folded))
        return folded.flatten(), [view for view in views for _ in range(folded.shape[1])]
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
        labels = torch.where(labels == NEITHER, NEITHER, torch.where(labels > OTHER, RELATED, OTHER))
        return labels, [""] * len(labels)
    labels = per_tile[0]
    labels = torch.cat([torch.tensor([NEITHER]), labels]) if cls_kept else labels
    return labels, [""] * len(labels)


def _side(size) -> int:
    """A square size given as an int or as (height, width) (InternVL's vision config)."""
    return size if isinstance(size, int) else int(size[0])


def _shuffled_labels(model: LlavaModel, per_tile: torch.Tensor, strategy: str) -> torch.Tensor:
    """InternVL: each tile's patch labels through the model's own pixel shuffle (a token is RELATED if any of the
    patches folded into it is), ``(n_tiles, tokens per tile)``."""
    if strategy != "default":
        raise MmflowError(f"InternVL patch groups need vision_feature_select_strategy='default', not {strategy!r}")
    n, patches = per_tile.shape
    side = math.isqrt(patches)
    shuffle = reduce(getattr, family_of(model).pixel_shuffle.split("."), model)
    folded = shuffle(per_tile.view(n, side, side, 1), scale_factor=model.config.downsample_ratio)
    return torch.where((folded > OTHER).any(-1), RELATED, OTHER).flatten(1)


def _sequence_shuffled(model: LlavaModel, per_tile: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Idefics3: each tile's flat patch sequence through the model's own pixel shuffle (a token is RELATED if any of
    its ``scale_factor`` x ``scale_factor`` patches is), tiles in order, and each token's view: the global image is
    always the last tile (the only one for an image that is not split), the crops before it."""
    blocks = sequence_shuffle(model)(per_tile[..., None], model.config.scale_factor)  # (n_tiles, tokens, scale**2)
    labels = torch.where((blocks == RELATED).any(-1), RELATED, OTHER)  # (n_tiles, tokens)
    crops, whole = family_of(model).patch_views
    views = [whole if t == len(per_tile) - 1 else crops for t in range(len(per_tile))]
    return labels.flatten(), [view for view in views for _ in range(labels.shape[1])]


def _pooled_labels(per_tile: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gemma 3: each view's square patch grid average-pooled ``kernel`` x ``kernel`` (row-major, as the projector's
    ``AvgPool2d`` and flatten order the tokens; a token is RELATED if any of its patches is),
    ``(n_views, tokens per view)``."""
    n, side = len(per_tile), math.isqrt(per_tile.shape[1])
    grid = per_tile.view(n, side // kernel, kernel, side // kernel, kernel)
    return torch.where((grid == RELATED).any(4).any(2).flatten(1), RELATED, OTHER)


def _view_names(family, n: int) -> list[str]:
    """The view of each of an image's ``n`` tiles, in the processor's order: InternVL's crops, then the whole image
    last when there is more than one crop (:attr:`~mmflow.families.Family.patch_views`: ``tiles``, ``thumbnail``);
    Gemma 3's ``original``, then ``crop1``, ``crop2``, ... when pan-and-scan cropped it
    (:attr:`~mmflow.families.Family.processor_views`); ``""`` for an image seen in one view."""
    if family.patch_views:
        crops, whole = family.patch_views
        return [whole if n > 1 and tile == n - 1 else crops for tile in range(n)]
    if family.processor_views and n > 1:
        return ["original"] + [f"crop{k}" for k in range(1, n)]
    return [""] * n


def native_cell(model: LlavaModel, processor) -> int:
    """The side in pixels of the cell one image token covers in the "native" layout (Pixtral: the vision patch,
    Mistral3: the patch times the merger's ``spatial_merge_size``), as the processor and the model both state it.

    Raises:
        MmflowError: if the processor's patch size and merge disagree with the model's.
    """
    cell = processor.patch_size * processor.spatial_merge_size
    expected = model.config.vision_config.patch_size * getattr(model.config, "spatial_merge_size", 1)
    if cell != expected:
        raise MmflowError(
            f"The processor makes {cell} px image-token cells (patch_size {processor.patch_size} x spatial_merge_size "
            f"{processor.spatial_merge_size}) and the model {expected} px: processor and model disagree"
        )
    return cell


def _image_options(model: LlavaModel, processor) -> dict:
    """Options the processor call passes to its image processor: its ``images_kwargs`` (e.g. InternVL's
    ``crop_to_patches``) with the checkpoint's own view options over them (Gemma 3's pan-and-scan, as
    :func:`~mmflow.inputs.encode` passes them: :func:`~mmflow.families.view_options`) and, for the "native" layout,
    the cell size."""
    fixed = ("return_tensors", "do_rescale", "do_normalize", "resample")  # mmflow sets these itself
    own = {**getattr(processor, "images_kwargs", {}), **view_options(processor, model)}
    options = {k: v for k, v in own.items() if k not in fixed}
    if family_of(model).pixel_layout == "native":
        cell = native_cell(model, processor)
        options["patch_size"] = {"height": cell, "width": cell}
    return options


def _merged_labels(rows: torch.Tensor, image_processor) -> torch.Tensor:
    """Labels of the image tokens of one image in the Qwen layout: ``rows`` holds one flattened ViT patch per row
    ``(C, temporal, patch, patch)``, ``merge_size**2`` consecutive rows per image token (a 28 px cell; Qwen3-VL's
    16 px patches make 32 px cells), in the order of the tokens; a token is RELATED if any pixel of its cell is red."""
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
    """``related_patches`` / ``other_patches``: image-token positions whose patch overlaps any box, or none; where
    the model sees the image in several views these are the union over the views, and each view is also its own
    pair of groups, ``related_patches@<view>`` / ``other_patches@<view>``: InternVL's ``tiles`` and ``thumbnail``
    (:attr:`~mmflow.families.Family.patch_views`, always present, empty where the image has no such view, e.g. no
    thumbnail for a single tile; Idefics3's ``tiles`` and ``global``, ``@tiles`` empty for an image that is not split),
    Gemma 3's ``original``, ``crop1``, ... (only when pan-and-scan cropped the image).

    Args:
        image_positions: positions of the image tokens in the language model's sequence.
        size: the original image's (W, H).
        boxes: the question's object boxes ``(x, y, w, h)`` in original-image pixels.
        inputs: ``"paper"`` or ``"processor"``: the geometry the image went through (see :func:`model_view`).

    Raises:
        MmflowError: if the processor and the model disagree on the number of image tokens.
    """
    labels, views = _labels_and_views(model, processor, size, boxes, inputs)
    if len(labels) != len(image_positions):
        raise MmflowError(
            f"{len(labels)} patch labels for {len(image_positions)} image tokens: processor and model disagree"
        )
    rows = list(zip(image_positions, labels.tolist(), views))
    groups = {}
    for view in dict.fromkeys(("", *family_of(model).patch_views, *views)):  # the union first, views in order
        suffix = f"@{view}" if view else ""
        groups[f"related_patches{suffix}"] = [p for p, lab, v in rows if lab == RELATED and view in ("", v)]
        groups[f"other_patches{suffix}"] = [p for p, lab, v in rows if lab == OTHER and view in ("", v)]
    return groups


def base_patch_grid(
    model: LlavaModel, processor, image: Image.Image, boxes: Sequence[Sequence[float]], inputs: str = "processor"
) -> tuple[np.ndarray, np.ndarray]:
    """(processed base tile as HxWx3 uint8, labels of its patch grid): what the overlays show. The base tile is the
    whole image as the model sees it: LLaVA's tile, anyres' base tile, Qwen's resized image, InternVL's thumbnail
    (its only tile when the image is not cropped), Gemma 3's squashed original (its first view), Idefics3's global
    image (its last tile)."""
    from transformers.image_utils import PILImageResampling

    labels = image_token_labels(model, processor, image.size, boxes, inputs)
    image = model_view(image, processor, model, inputs)
    processed = _processed(model, processor, image, PILImageResampling.BICUBIC)
    if family_of(model).pixel_layout == "native":  # one image, one token per cell, row by row
        base, cell = processed["pixel_values"][0], native_cell(model, processor)
        grid = labels.view(base.shape[1] // cell, base.shape[2] // cell).numpy()
        return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
    if family_of(model).pixel_layout == "merged_patches":  # one image, one token per 28 px cell
        base = _unpatchify(processed["pixel_values"], processed["image_grid_thw"][0], processor.image_processor)
        merge = processor.image_processor.merge_size
        _, grid_h, grid_w = (int(x) for x in processed["image_grid_thw"][0])
        grid = labels.view(grid_h // merge, grid_w // merge).numpy()
        return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
    if family_of(model).sequence_shuffle:  # Idefics3: the global image (the last tile, or the only one)
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        base, grid = processed["pixel_values"][0][-1], labels[-side * side :].view(side, side).numpy()
        return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
    if family_of(model).pixel_shuffle:  # InternVL: the last tile (the thumbnail, or the only tile)
        last = labels[-_tokens_per_tile(model) :]
        side = math.isqrt(len(last))
        base = processed["pixel_values"][-1]
        return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), last.view(side, side).numpy()
    vision = model.config.vision_config
    side = _side(vision.image_size) // _side(vision.patch_size) // token_pool(model)  # Gemma 3: its first view
    grid = labels[labels != NEITHER][: side * side].view(side, side).numpy()
    pixels = processed["pixel_values"][0]
    base = pixels if pixels.dim() == 3 else pixels[0]
    return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid


def _tokens_per_tile(model: LlavaModel) -> int:
    """Image tokens per InternVL tile: its patch grid after the pixel shuffle."""
    cfg = model.config
    side = _side(cfg.vision_config.image_size) // _side(cfg.vision_config.patch_size)
    return round(side * cfg.downsample_ratio) ** 2
