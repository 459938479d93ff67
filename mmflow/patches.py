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
from mmflow.models import LlavaModel, family_of, pack_image_features, sequence_shuffle

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
    smart_resize into 28 px cells, Idefics3's tiles and global image, with nearest-neighbour resampling and no
    normalisation) and, for anyres families, the model's own feature packing (unpadding, newline tokens, and
    OneVision's bilinear downsampling of large grids, after which a token is RELATED if any related patch contributes
    to it), for Idefics3 the model's own pixel shuffle (a token is RELATED if any of its patches is).

    Returns:
        A float tensor of shape ``(n_image_tokens,)``.
    """
    return _labels_and_views(model, processor, size, boxes, inputs)[0]


def _labels_and_views(model: LlavaModel, processor, size, boxes, inputs: str) -> tuple[torch.Tensor, list[str]]:
    """:func:`image_token_labels` and the view of each token (:attr:`~mmflow.families.Family.patch_views`: the last
    tile is the last view, the others the first; all ``""`` for a family seen in one view)."""
    from transformers.image_utils import PILImageResampling

    mask = model_view(box_mask(size, boxes), processor, model, inputs)  # padding is mean colour: "other"
    pixels = processor.image_processor(
        mask, resample=PILImageResampling.NEAREST, do_rescale=False, do_normalize=False, return_tensors="pt"
    )
    cfg = model.config
    patch = cfg.vision_config.patch_size
    if family_of(model).pixel_layout == "merged_patches":
        return _one_view(_merged_labels(pixels["pixel_values"], processor.image_processor))
    tiles = pixels["pixel_values"][0]
    if tiles.dim() == 3:
        tiles = tiles[None]
    per_tile = torch.stack([_patch_labels(tile, patch) for tile in tiles])  # (n_tiles, patches)
    shuffle = sequence_shuffle(model)
    if shuffle is not None:  # Idefics3: the model's own pixel shuffle, scale x scale patches per token
        blocks = shuffle(per_tile[..., None], cfg.scale_factor)  # (n_tiles, tokens, scale**2)
        labels = torch.where((blocks == RELATED).any(-1), RELATED, OTHER)  # (n_tiles, tokens)
        views = family_of(model).patch_views or ("",)
        tile_views = [views[-1] if t == len(tiles) - 1 else views[0] for t in range(len(tiles))]
        return labels.flatten(), [view for view in tile_views for _ in range(labels.shape[1])]
    strategy = cfg.vision_feature_select_strategy
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
        return _one_view(torch.where(labels == NEITHER, NEITHER, torch.where(labels > OTHER, RELATED, OTHER)))
    labels = per_tile[0]
    return _one_view(torch.cat([torch.tensor([NEITHER]), labels]) if cls_kept else labels)


def _one_view(labels: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``labels`` of an image seen in one view (every token's view ``""``)."""
    return labels, [""] * len(labels)


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
    """``related_patches`` / ``other_patches``: image-token positions whose patch overlaps any box, or none, over
    all the views an image is seen in; for a family with :attr:`~mmflow.families.Family.patch_views` also per view,
    e.g. Idefics3's ``related_patches@tiles`` and ``related_patches@global`` (``@tiles`` empty when the image is
    not split).

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
    for view in ("", *family_of(model).patch_views):  # the union over views, then each view on its own
        suffix = f"@{view}" if view else ""
        groups[f"related_patches{suffix}"] = [p for p, lab, v in rows if lab == RELATED and view in ("", v)]
        groups[f"other_patches{suffix}"] = [p for p, lab, v in rows if lab == OTHER and view in ("", v)]
    return groups


def base_patch_grid(
    model: LlavaModel, processor, image: Image.Image, boxes: Sequence[Sequence[float]], inputs: str = "processor"
) -> tuple[np.ndarray, np.ndarray]:
    """(processed base tile as HxWx3 uint8, labels of its patch grid): what the overlays show (Idefics3: the global
    image and its tokens)."""
    from transformers.image_utils import PILImageResampling

    labels = image_token_labels(model, processor, image.size, boxes, inputs)
    image = model_view(image, processor, model, inputs)
    processed = processor.image_processor(
        image, do_rescale=False, do_normalize=False, resample=PILImageResampling.BICUBIC, return_tensors="pt"
    )
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
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    grid = labels[labels != NEITHER][: side * side].view(side, side).numpy()
    pixels = processed["pixel_values"][0]
    base = pixels if pixels.dim() == 3 else pixels[0]
    return base.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy(), grid
