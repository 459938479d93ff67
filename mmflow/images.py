"""Where data meets the image: files to RGB pixels (the one conversion the runs and ``make check-data`` share,
and what it changes), and boxes against the image's size.

The rules (the run and check-data apply the same functions):

* RGB, L (grey), 1 (black and white), P (palette), CMYK and YCbCr are converted by PIL's ``convert("RGB")``, as
  the paper's code does (``Image.open(f).convert("RGB")``).
* Transparency (an alpha band, or a palette/colour-key ``transparency``) is composited onto white, as the llava-hf
  image processors' ``convert_to_rgb`` does; a plain ``convert("RGB")`` would keep whatever colour lies under a
  transparent pixel.
* 16-bit grey (I;16, I;16L, I;16B, I;16N) and 32-bit integer grey (I, read as 16-bit: values 0..65535) are scaled
  to 8 bits, ``round(v / 257)``, so 65535 becomes 255 (``convert("RGB")`` would clip every value above 255 to
  white). An ``I`` image with values outside 0..65535, or a 16-bit one with transparency, is refused.
* Other modes (F: 32-bit float, whose range is not defined; I;16S, LAB, HSV, ...) are refused, naming the mode.
* EXIF orientation is not applied: pixels are read as stored, as the paper's code and the llava-hf processors do
  with a PIL image, so ``image_w``/``image_h`` and the boxes are taken in stored pixels.

:func:`conversion_notes` says, per image, where these rules change something (alpha that is not opaque, 16-bit
scaling, an EXIF orientation that is not applied); ``make check-data`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mmflow.errors import MmflowError

#: Modes PIL's ``convert("RGB")`` turns into RGB without losing anything a model would see (no alpha).
PLAIN_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
#: Modes with an alpha band (composited onto white).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
#: Grey modes read as 16-bit values and scaled to 8 bits.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: The EXIF tag of the orientation.
EXIF_ORIENTATION = 0x0112


def has_alpha(image: Image.Image) -> bool:
    """True if the image carries transparency: an alpha band or a ``transparency`` entry (palette or colour key),
    the test of transformers' ``convert_to_rgb``."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _sixteen_to_eight(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit (or ``I``) grey image as 8-bit RGB, ``round(v / 257)``; refused if a value lies outside 0..65535."""
    if has_alpha(image):
        raise MmflowError(
            f"{name}: image mode {image.mode!r} with transparency is not supported; save it as 8-bit RGBA"
        )
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise MmflowError(
            f"{name}: image mode {image.mode!r} with values {values.min()}..{values.max()} outside 0..65535 (16 bits); "
            "save it as 8-bit RGB"
        )
    eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The image as 8-bit RGB by the rules of this module (the image itself if it is RGB without transparency).

    Args:
        image: a PIL image of any mode.
        name: the image for messages (e.g. the example and the file).

    Raises:
        MmflowError: naming ``name`` and the mode for a mode that is refused.

    Example:
        >>> import numpy as np
        >>> grey16 = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
        >>> np.asarray(to_rgb(grey16))[0, :, 0].tolist()
        [0, 1, 255]
        >>> to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(image, name)
    if image.mode not in PLAIN_MODES + ALPHA_MODES:
        raise MmflowError(
            f"{name}: image mode {image.mode!r} is not supported (supported: "
            f"{', '.join(PLAIN_MODES + ALPHA_MODES + SIXTEEN_BIT_MODES)}); save it as 8-bit RGB"
        )
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1, the default, if it has none or an unreadable one)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: PIL reads the pixels anyway
        return 1
    return value if isinstance(value, int) else 1


def conversion_notes(image: Image.Image) -> list[str]:
    """Where :func:`to_rgb` and the stored-pixels rule change what a viewer would show: transparency that is not
    opaque, 16-bit scaling, an EXIF orientation that is not applied. Empty for a plain RGB/grey image.

    Example:
        >>> conversion_notes(Image.new("LA", (2, 1), (0, 0)))
        ['has alpha: 2 of 2 pixels not opaque, composited onto white']
        >>> conversion_notes(Image.new("RGB", (2, 1)))
        []
    """
    notes = []
    if image.mode in SIXTEEN_BIT_MODES:
        bits = "32-bit integer, read as 16-bit" if image.mode == "I" else "16-bit"
        notes.append(f"{image.mode} ({bits}) grey: scaled to 8 bits")
    elif has_alpha(image) and image.mode in PLAIN_MODES + ALPHA_MODES:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        see_through = int((alpha < 255).sum())
        if see_through:
            notes.append(f"has alpha: {see_through} of {alpha.size} pixels not opaque, composited onto white")
    orientation = exif_orientation(image)
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} not applied: pixels read as stored")
    return notes


def confined(path: Path, root: Path, name: str) -> Path:
    """``path`` with every link resolved, refused unless it lies inside ``root`` (also resolved).

    Raises:
        MmflowError: naming ``name``, the path and where it leads, for a path or symbolic link that leads outside.
    """
    real, folder = path.resolve(), root.resolve()
    if not real.is_relative_to(folder):
        raise MmflowError(
            f"{name}: {path} leads to {real}, outside the image folder {folder}; images are only read from the "
            "image folder (link the whole folder, not single files)"
        )
    return real


def read_rgb(path: Path, name: str, root: Path | None = None) -> tuple[Image.Image, list[str]]:
    """Decode an image file to RGB by :func:`to_rgb`, with its :func:`conversion_notes`.

    Args:
        path: the image file.
        name: the image for messages (e.g. ``"Image of x.csv line 7, question_id 12"``).
        root: if given, the folder the file (after resolving links) must lie in (:func:`confined`).

    Raises:
        MmflowError: naming ``name`` and the file if it leads outside ``root``, is missing, unreadable, or of a
            refused mode.
    """
    real = confined(path, root, name) if root is not None else path
    if not real.is_file():
        raise MmflowError(f"{name} not found: {path}")
    try:
        with Image.open(real) as img:
            img.load()
            notes = conversion_notes(img)
            rgb = to_rgb(img, f"{name} ({path})")
            return (rgb.copy() if rgb is img else rgb), notes
    except (OSError, Image.DecompressionBombError) as err:
        raise MmflowError(f"{name} is not a readable image: {path} ({err})") from err


#: How many pixels a box may reach past the image's right or bottom edge before ``make check-data`` notes it.
#: GQA boxes often end a pixel or two past the edge (95 of the 7,140 boxes in the paper's CSVs by <= 1 px, 4 more
#: by <= 2 px); every such part is clipped, only a larger overshoot (3 boxes) is noted.
BOX_EDGE_SLACK = 2.0


def box_error(box: Sequence[float]) -> tuple[str, str] | None:
    """``(column letter, reason)`` if a box ``(x, y, w, h)`` breaks the rule a box must keep wherever it is read,
    else None: its origin is not negative (x, y >= 0) and its width and height are positive.

    Example:
        >>> box_error((-30, -30, 10, 12))
        ('x', 'must start inside the image (x, y >= 0), got (-30, -30, 10, 12)')
        >>> box_error((3, 4, 0, 12))[0], box_error((0, 0, 1, 1))
        ('w', None)
    """
    shown = "(" + ", ".join(f"{c:g}" for c in box) + ")"
    for letter, value in zip("xy", box[:2]):
        if value < 0:
            return letter, f"must start inside the image (x, y >= 0), got {shown}"
    for letter, value in zip("wh", box[2:]):
        if value <= 0:
            return letter, f"must have a positive width and height, got {shown}"
    return None


def box_issues(
    size: tuple[int, int], boxes: Sequence[Sequence[float]] | None, columns: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """``(errors, notes)`` of boxes ``(x, y, w, h)`` against the image size ``(image_w, image_h)``; ``columns``
    names each box in messages (its CSV column prefix; else its number).

    The rule: a box starts inside the image (0 <= x < image_w, 0 <= y < image_h) and has a positive size; the
    part past the right or bottom edge is clipped (:func:`mmflow.patches.box_mask`), and noted when it exceeds
    :data:`BOX_EDGE_SLACK` pixels. A box that breaks the rule is an error for the patch groups (the row stays
    usable for analyses without them); rows of the CSVs with a negative or empty box are refused when read.

    Example:
        >>> errors, notes = box_issues((64, 48), [(70, 0, 5, 5), (60, 0, 10, 5)])
        >>> errors
        ['box 1 (70, 0, 5, 5) lies outside the 64x48 image']
        >>> notes
        ['box 2 (60, 0, 10, 5) reaches 6 px past the 64x48 image: the part outside is clipped']
    """
    errors, notes = [], []
    width, height = size
    for i, box in enumerate(boxes or []):
        column = f"box of '{columns[i]}'" if i < len(columns) else f"box {i + 1}"
        shown = "(" + ", ".join(f"{c:g}" for c in box) + ")"
        x, y, w, h = box
        problem = box_error(box)
        if problem:
            errors.append(f"{column} {shown} {problem[1].split(', got')[0]}")
        elif x >= width or y >= height:
            errors.append(f"{column} {shown} lies outside the {width}x{height} image")
        elif max(x + w - width, y + h - height) > BOX_EDGE_SLACK:
            past = max(x + w - width, y + h - height)
            notes.append(
                f"{column} {shown} reaches {past:g} px past the {width}x{height} image: the part outside is clipped"
            )
    return errors, notes
