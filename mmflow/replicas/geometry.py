"""Each replica family's patch geometry written out from its description, independently of :mod:`mmflow.patches`:
for an image of ``size`` (width, height) and a ``box`` (x, y, w, h), the label every image token should get.

A label is ``"R"`` (related: the token sees the box), ``"O"`` (other), ``"N"`` (neither: a newline feature) or
``"?"`` (related or other: the box edge falls within a pixel of the token's cell, where rounding may go either way).
"""

from __future__ import annotations

import math

import torch

from mmflow.replicas import gemma3, onevision, pixtral, qwen, qwen3
from mmflow.replicas import idefics3 as idefics3_replica
from mmflow.replicas import internvl as internvl_replica
from mmflow.replicas import llava as tiny


def _overlap_labels(box, transform, rows: int, cols: int, cell: float) -> list[str]:
    """Row-major labels of a ``rows`` x ``cols`` grid of ``cell``-px cells: "R" where the transformed box overlaps
    the cell by at least a pixel each way, "?" where it comes within a pixel, else "O"."""
    x, y, w, h = box
    (x0, y0), (x1, y1) = transform(x, y), transform(x + w, y + h)
    labels = []
    for r in range(rows):
        for c in range(cols):
            ox = min(x1, (c + 1) * cell) - max(x0, c * cell)
            oy = min(y1, (r + 1) * cell) - max(y0, r * cell)
            labels.append("R" if ox >= 1 and oy >= 1 else "?" if ox > -1 and oy > -1 else "O")
    return labels


def _hits(n_out: int, n_in: int, lo: float, hi: float, offset: int = 0, n_canvas: int | None = None) -> list[bool]:
    """Per pixel of a canvas axis holding the axis resized from ``n_in`` to ``n_out`` px at ``offset``: does its
    nearest source pixel (pixel centres) lie in the box's [lo, hi) range? Padding pixels never do."""
    lo, hi = math.floor(lo), math.ceil(hi)
    return [
        0 <= i - offset < n_out and lo <= math.floor((i - offset + 0.5) * n_in / n_out) < hi
        for i in range(n_canvas or n_out)
    ]


def _cells(hits: list[bool | None], cell: int) -> list[bool | None]:
    """Per ``cell``-px cell of an axis: does any of its pixels hit? For hits that may be undecided (None, see
    :func:`_chained_hits`): True if a pixel surely hits, False if none can, else None."""
    out = []
    for c in range(0, len(hits), cell):
        part = hits[c : c + cell]
        out.append(True if True in part else None if None in part else False)
    return out


def _best_resolution(width: int, height: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of grid resolution (height, width): the most effective pixels, then the least waste."""
    best, best_effective, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        if effective > best_effective or (effective == best_effective and w * h - effective < best_waste):
            best, best_effective, best_waste = (h, w), effective, w * h - effective
    return best


def _fitted(width: int, height: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """The image resized to fit a ``tw`` x ``th`` canvas keeping its aspect (the bound side exact, the other
    rounded up), centred: (new width, new height, left pad, top pad)."""
    if tw / width < th / height:
        nw, nh = tw, min(math.ceil(height * tw / width), th)
    else:
        nw, nh = min(math.ceil(width * th / height), tw), th
    return nw, nh, (tw - nw) // 2, (th - nh) // 2


def _unpadded(rows: int, cols: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The feature rows/columns kept after removing the padding: (r0, r1, c0, c1)."""
    if cols / rows < width / height:
        pad = (rows - int(round(height * cols / width, 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * rows / height, 7))) // 2
    return 0, rows, pad, cols - pad


def llava_paper(size, box) -> list[str]:
    """LLaVA-1.5 with the paper's inputs: padded to a centred square of the long edge, resized to the tile."""
    width, height = size
    side, cell, long = tiny.IMAGE, tiny.PATCH, max(size)
    ox, oy = (long - width) // 2, (long - height) // 2
    grid = side // cell
    return _overlap_labels(box, lambda x, y: ((x + ox) * side / long, (y + oy) * side / long), grid, grid, cell)


def llava_next(size, box) -> list[str]:
    """LLaVA-NeXT anyres: the squashed base tile, then the best grid's features, unpadded, a newline per row."""
    width, height = size
    grid, cell = tiny.IMAGE // tiny.PATCH, tiny.PATCH
    labels = _overlap_labels(box, lambda x, y: (x * tiny.IMAGE / width, y * tiny.IMAGE / height), grid, grid, cell)
    th, tw = _best_resolution(width, height, tiny.GRID_PINPOINTS)
    nw, nh, px, py = _fitted(width, height, th, tw)
    rows, cols = th // cell, tw // cell
    full = _overlap_labels(box, lambda x, y: (x * nw / width + px, y * nh / height + py), rows, cols, cell)
    r0, r1, c0, c1 = _unpadded(rows, cols, width, height)
    for r in range(r0, r1):
        labels += full[r * cols + c0 : r * cols + c1] + ["N"]
    return labels


def onevision_paper(size, box) -> list[str]:
    """LLaVA-OneVision anyres_max_9: the base tile (nearest-neighbour squeeze), then the best grid's features,
    unpadded, bilinearly downsampled where they exceed 9 tiles by more than 1.1 (a token is related if a related
    feature contributes to it), a newline per row."""
    (width, height), (x, y, w, h) = size, box
    tile, cell = onevision.TILE, onevision.PATCH
    rows, cols = _cells(_hits(tile, height, y, y + h), cell), _cells(_hits(tile, width, x, x + w), cell)
    labels = ["R" if r and c else "O" for r in rows for c in cols]
    th, tw = _best_resolution(width, height, onevision.PINPOINTS)
    nw, nh, px, py = _fitted(width, height, th, tw)
    rows = _cells(_hits(nh, height, y, y + h, py, th), cell)
    cols = _cells(_hits(nw, width, x, x + w, px, tw), cell)
    r0, r1, c0, c1 = _unpadded(len(rows), len(cols), width, height)
    features = torch.tensor([[float(rows[r] and cols[c]) for c in range(c0, c1)] for r in range(r0, r1)])
    per_tile = (tile // cell) ** 2
    ratio = math.sqrt(features.numel() / (9 * per_tile))  # the side's ratio to 9 tiles' (not the area's)
    if ratio > 1.1:
        shape = [int(features.shape[0] // ratio), int(features.shape[1] // ratio)]
        features = torch.nn.functional.interpolate(features[None, None], shape, mode="bilinear")[0, 0]
    for row in features.tolist():
        labels += ["R" if value > 0 else "O" for value in row] + ["N"]
    return labels


def smart_resize(height: int, width: int, factor: int = 28, low: int | None = None, high: int | None = None):
    """Qwen's resize rule, from its description: whole ``factor``-px cells, pixels within [``low``, ``high``] (by
    default the Qwen2-VL replica's bounds); returns (height, width)."""
    low, high = low or qwen.MIN_PIXELS, high or qwen.MAX_PIXELS
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _resampled(size, box, rh: int, rw: int, cell: int) -> list[str]:
    """The image resized to ``rh`` x ``rw`` px (nearest neighbour, pixel centres), one token per ``cell``-px cell,
    row-major: "R" where a pixel of the cell samples the box, else "O"."""
    (width, height), (x, y, w, h) = size, box
    rows, cols = _cells(_hits(rh, height, y, y + h), cell), _cells(_hits(rw, width, x, x + w), cell)
    return ["R" if r and c else "O" for r in rows for c in cols]


def qwen_vl(size, box) -> list[str]:
    """Qwen2-VL / Qwen2.5-VL: ``smart_resize``, one token per 28 px cell (14 px patches merged 2 x 2), row-major;
    a cell is related if one of its pixels samples the box (nearest neighbour)."""
    rh, rw = smart_resize(size[1], size[0])
    return _resampled(size, box, rh, rw, qwen.PATCH * qwen.MERGE)


def qwen3_vl(size, box) -> list[str]:
    """Qwen3-VL / Qwen3-VL-MoE: as Qwen2-VL with 16 px patches merged 2 x 2 (32 px cells) and the Qwen3 replica's
    pixel bounds."""
    cell = qwen3.PATCH * qwen3.MERGE
    rh, rw = smart_resize(size[1], size[0], cell, qwen3.MIN_PIXELS, qwen3.MAX_PIXELS)
    return _resampled(size, box, rh, rw, cell)


def _tile_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's dynamic tiling, from its description: (columns, rows) of the grid of at most ``max_tiles`` tiles
    whose aspect ratio is closest to the image's, grids taken by tile count (then by columns); on a tie the later grid
    wins when the image's area exceeds half of the grid's."""
    tile = internvl_replica.TILE
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)), key=math.prod)
    best, best_diff = (1, 1), math.inf
    for c, r in grids:
        diff = abs(width / height - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def internvl(size, box) -> list[str]:
    """InternVL: the image squeezed onto a grid of 84 px tiles (:func:`_tile_grid`), each tile's tokens row-major
    over 28 px cells (14 px patches, pixel shuffle 0.5), tiles row-major; then, with more than one tile, the
    thumbnail (the whole image squeezed onto one tile)."""
    tile, cell = internvl_replica.TILE, internvl_replica.PATCH * 2
    cols, rows = _tile_grid(*size, internvl_replica.MAX_PATCHES)
    full = _resampled(size, box, rows * tile, cols * tile, cell)
    per, line = tile // cell, cols * tile // cell
    labels = [
        full[(tr * per + r) * line + tc * per + c]
        for tr in range(rows)
        for tc in range(cols)
        for r in range(per)
        for c in range(per)
    ]
    return labels + (_resampled(size, box, tile, tile, cell) if rows * cols > 1 else [])


def _native(kind: str, size, box) -> list[str]:
    """Pixtral's native resolution, from its description: scaled down (never up, sides floored) so the longest side
    fits the longest edge, each side rounded up to whole cells (patch x spatial merge), one token per cell."""
    patch, merge, edge = pixtral.GEOMETRY[kind]
    cell, (width, height) = patch * merge, size
    ratio = max(width / edge, height / edge)
    if ratio > 1:
        width, height = math.floor(width / ratio), math.floor(height / ratio)
    return _resampled(size, box, math.ceil(height / cell) * cell, math.ceil(width / cell) * cell, cell)


def pixtral_native(size, box) -> list[str]:
    """Pixtral-12B: 16 px cells (no merge), longest edge 128 px in the replica."""
    return _native("pixtral", size, box)


def mistral3_native(size, box) -> list[str]:
    """Mistral3 (Mistral-Small-3.1): 14 px patches merged 2 x 2 (28 px cells), longest edge 168 px in the replica."""
    return _native("mistral3", size, box)


def gemma3_squash(size, box) -> list[str]:
    """Gemma 3: the image squashed to the tower's square; one token per pooled cell (side // sqrt(tokens) px)."""
    side = gemma3.IMAGE
    return _resampled(size, box, side, side, side // math.isqrt(gemma3.TOKENS))


def _idefics3_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Idefics3's two resizes, from the image processor's description: the longest edge to ``LONGEST`` (the other
    side by the aspect ratio, truncated, then made even), then both sides up to whole tiles (the long side rounded
    up, the short one recomputed from the aspect ratio, then rounded up). Returns ((w1, h1), (w2, h2))."""
    edge, tile = idefics3_replica.LONGEST, idefics3_replica.TILE
    aspect = width / height
    if width >= height:
        w1, h1 = edge, int(edge / aspect)
        h1 += h1 % 2
    else:
        w1, h1 = int(edge * aspect), edge
        w1 += w1 % 2
    aspect = w1 / h1
    if w1 >= h1:
        w2 = math.ceil(w1 / tile) * tile
        h2 = math.ceil(int(w2 / aspect) / tile) * tile
    else:
        h2 = math.ceil(h1 / tile) * tile
        w2 = math.ceil(int(h2 * aspect) / tile) * tile
    return (w1, h1), (w2, h2)


def _chained_hits(n_in: int, steps: list[int], lo: float, hi: float) -> list[bool | None]:
    """Per pixel of an axis resized (nearest neighbour, pixel centres) from ``n_in`` px through each of ``steps``
    in turn: does the original pixel it samples lie in the box's [lo, hi) range? None where that depends on an
    exact tie: a pixel centre that maps exactly onto a source pixel boundary, which PIL's floating-point nearest
    neighbour may resolve to either side (e.g. 84 -> 102 -> 128 px: rows 95-96 sample source row 63 exactly, PIL
    gives 62)."""
    sources = [{i} for i in range(steps[-1])]
    for n_out, n_from in reversed(list(zip(steps, [n_in, *steps[:-1]]))):
        nxt = []
        for options in sources:
            found = set()
            for i in options:
                top, rest = divmod((2 * i + 1) * n_from, 2 * n_out)  # (i + 0.5) * n_from / n_out, exactly
                found |= {top - 1, top} if rest == 0 and top > 0 else {top}
            nxt.append(found)
        sources = nxt
    hits = [{math.floor(lo) <= s < math.ceil(hi) for s in options} for options in sources]
    return [next(iter(h)) if len(h) == 1 else None for h in hits]


def idefics3(size, box) -> list[str]:
    """Idefics3 / SmolVLM: the two resizes (:func:`_idefics3_sizes`), the result cut into ``TILE`` px tiles
    (row-major), each tile's tokens row-major over ``PATCH * SCALE`` px cells (the pixel shuffle folds SCALE x SCALE
    patches into a token); then the global image, the tiled image squashed to one tile, last. ``"?"``: a token
    whose label depends on an exact tie of the resize (see :func:`_chained_hits`), either label is right."""
    (width, height), (x, y, w, h) = size, box
    (w1, h1), (w2, h2) = _idefics3_sizes(width, height)
    tile, cell = idefics3_replica.TILE, idefics3_replica.PATCH * idefics3_replica.SCALE
    xs, ys = _chained_hits(width, [w1, w2], x, x + w), _chained_hits(height, [h1, h2], y, y + h)
    gx, gy = _chained_hits(width, [w1, w2, tile], x, x + w), _chained_hits(height, [h1, h2, tile], y, y + h)

    def one_tile(hit_y: list[bool | None], hit_x: list[bool | None]) -> list[str]:
        rows, cols = _cells(hit_y, cell), _cells(hit_x, cell)
        return ["O" if r is False or c is False else "R" if r and c else "?" for r in rows for c in cols]

    tiles = [
        one_tile(ys[r * tile : (r + 1) * tile], xs[c * tile : (c + 1) * tile])
        for r in range(h2 // tile)
        for c in range(w2 // tile)
    ]
    return [label for labels in tiles for label in labels] + one_tile(gy, gx)
