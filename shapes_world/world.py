"""Shapes world: a procedural, seeded stand-in for the GQA question subsets used in the paper.

Images are 64x64 RGB on a dark, slightly noisy background, split into a 4x4 grid of 16-pixel cells, which are
exactly the vision tower's patches. A scene holds 2-4 objects, each drawn entirely inside its own grid cell, with

* a shape (circle, square, triangle, diamond); shapes are distinct within an image, so "the circle" is unique;
* a colour (red, green, blue, yellow, purple, cyan);
* a material: "metal" is shaded with a radial gradient and a white specular highlight, "rubber" is flat and matte;
* a size: "small" (radius 3.5-4.5 px) or "large" (radius 6-7.2 px);
* a horizontal position: cells in columns 0-1 are in the left half, columns 2-3 in the right half.

Objects sit near their cell's centre (offset at most MAX_JITTER = 1 px), which keeps shapes recognisable from a
single patch. Boxes are the tight bounding boxes of the drawn pixels (x, y = top-left corner, w, h sizes, in pixels).

Questions follow the paper's six GQA families, with single-word lowercase gold answers (as in the GQA CSVs) and
the same column names as those CSVs. Every question is made answer-balanced (the gold answer is drawn first and
the scene is then constrained to produce it), and the world is constrained so that every answer is unambiguous:

* ChooseAttr  "Is the square red or blue?" (also metal/rubber and small/large): options in random order.
* ChooseCat   "Which shape is red, the circle or the square?": the queried property value (colour, material or
  size) belongs to the true-option object only; no other object in the image has it.
* ChooseRel   "Is the circle to the left or to the right of the square?": the two objects lie in opposite halves
  of the image. As in GQA, object1 is the reference ("square") and object2 the subject ("circle").
* CompareAttr "What do the circle and the square have in common?" -> color / material / size: the two objects
  share exactly one of the three attributes.
* LogicalObj  "Are there either circles or triangles that are red?" -> yes / no: for "yes" at least one named
  shape is present with the property; for "no" no present named shape has it (a named shape may be absent; its
  box is then None).
* QueryAttr   "In which part of the image is the triangle?" -> left / right: every object lies in one half by
  construction (cells never straddle the vertical midline).

Determinism: every example is generated from its own ``numpy`` generator seeded by ``(seed, task, index)``,
so the same seed gives an identical dataset. Training draws from a different seed namespace (:func:`sample`
with the key ``(TRAIN_NAMESPACE, ...)``), disjoint from :data:`EVAL_SEED`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import datasets
import numpy as np
from PIL import Image

EVAL_SEED = 20250611
TRAIN_NAMESPACE = 7_000_001  # first entropy word of every training example's seed; never an evaluation seed

IMAGE_SIZE = 64
CELL = 16
GRID = IMAGE_SIZE // CELL
BACKGROUND = (48, 48, 48)
NOISE_STD = 3.0

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 45, 45),
    "green": (50, 185, 70),
    "blue": (55, 95, 240),
    "yellow": (235, 215, 45),
    "purple": (160, 65, 210),
    "cyan": (45, 210, 220),
}
MATERIALS = ("metal", "rubber")
SIZES = ("small", "large")
SIDES = ("left", "right")
ATTRIBUTES = {"color": tuple(COLORS), "material": MATERIALS, "size": SIZES}
RADIUS = {"small": (3.5, 4.5), "large": (6.0, 7.2)}
MAX_JITTER = 1.0  # max offset (px) of an object's centre from its cell's centre
# Probability of asking about colour / material / size in the attribute-based families.
ATTRIBUTE_WEIGHTS = {"color": 0.5, "material": 0.25, "size": 0.25}


BOX_COLUMNS = ("x", "y", "w", "h")
#: CSV column prefixes of the objects a question is about (as in the paper's GQA CSVs)
ROLE_COLUMNS = ("central object", "object1", "object2")


@dataclass(frozen=True)
class Obj:
    """One object of a scene; ``cell`` is (column, row) in the 4x4 grid."""

    shape: str
    color: str
    material: str
    size: str
    cell: tuple[int, int]

    @property
    def side(self) -> str:
        """ "left" or "right": the image half holding the object's cell."""
        return "left" if self.cell[0] < GRID // 2 else "right"

    def attribute(self, name: str) -> str:
        """The value of attribute ``name`` ("color", "material" or "size")."""
        return getattr(self, name)


@dataclass(frozen=True)
class SceneQuestion:
    """A rendered scene with one question; ``boxes`` maps each object's shape to its (x, y, w, h) box."""

    task: str
    question: str
    answer: str
    true_option: str | None
    false_option: str | None
    objects: tuple[Obj, ...]
    roles: dict[str, str | None]  # column prefix ("central object", "object1", "object2") -> shape name
    image: Image.Image
    boxes: dict[str, tuple[float, float, float, float]]


# ----------------------------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> list[Obj]:
    """2-4 objects with distinct shapes in distinct cells and independent random attributes."""
    n = int(rng.integers(2, 5)) if n_objects is None else n_objects
    shapes = rng.permutation(SHAPES)[:n]
    cells = rng.permutation(GRID * GRID)[:n]
    return [
        Obj(
            shape=str(shape),
            color=str(rng.choice(list(COLORS))),
            material=str(rng.choice(MATERIALS)),
            size=str(rng.choice(SIZES)),
            cell=(int(c) % GRID, int(c) // GRID),
        )
        for shape, c in zip(shapes, cells)
    ]


def _cell_in_half(rng: np.random.Generator, side: str, taken: set[tuple[int, int]]) -> tuple[int, int]:
    """A free random cell in the given image half."""
    cols = range(GRID // 2) if side == "left" else range(GRID // 2, GRID)
    free = [(c, r) for c in cols for r in range(GRID) if (c, r) not in taken]
    return free[int(rng.integers(len(free)))]


def _place_on_side(rng: np.random.Generator, scene: list[Obj], index: int, side: str) -> None:
    """Move ``scene[index]`` to a free cell in the ``side`` half (in place)."""
    taken = {o.cell for i, o in enumerate(scene) if i != index}
    scene[index] = replace(scene[index], cell=_cell_in_half(rng, side, taken))


def _other_value(rng: np.random.Generator, attribute: str, not_values: set[str]) -> str:
    """A random value of ``attribute`` outside ``not_values``."""
    choices = [v for v in ATTRIBUTES[attribute] if v not in not_values]
    return str(choices[int(rng.integers(len(choices)))])


def _draw_attribute(rng: np.random.Generator, slot: int | None) -> str:
    """Colour / material / size with :data:`ATTRIBUTE_WEIGHTS`; cycled exactly (2:1:1) when ``slot`` is given."""
    if slot is not None:
        return ("color", "material", "color", "size")[slot % 4]
    names = list(ATTRIBUTE_WEIGHTS)
    return names[int(rng.choice(len(names), p=list(ATTRIBUTE_WEIGHTS.values())))]


def _pick(rng: np.random.Generator, values, slot: int | None) -> str:
    """A gold answer: ``values[slot % len(values)]`` (exact balance) or uniformly random when ``slot`` is None."""
    values = list(values)
    return str(values[slot % len(values)] if slot is not None else values[int(rng.integers(len(values)))])


# ---------------------------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean IMAGE_SIZE x IMAGE_SIZE mask of a shape centred at (cx, cy), sampled at pixel centres."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    raise ValueError(shape)


def _object_pixels(obj: Obj, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The object's mask and its float RGB colours (IMAGE_SIZE x IMAGE_SIZE x 3, valid where the mask is set)."""
    r = float(rng.uniform(*RADIUS[obj.size]))
    x0, y0 = obj.cell[0] * CELL, obj.cell[1] * CELL
    jitter = min(MAX_JITTER, CELL / 2 - r - 0.6)
    cx = x0 + CELL / 2 + float(rng.uniform(-jitter, jitter)) if jitter > 0 else x0 + CELL / 2
    cy = y0 + CELL / 2 + float(rng.uniform(-jitter, jitter)) if jitter > 0 else y0 + CELL / 2
    mask = _shape_mask(obj.shape, cx, cy, r)
    cell = np.zeros_like(mask)
    cell[y0 : y0 + CELL, x0 : x0 + CELL] = True
    mask &= cell
    base = np.array(COLORS[obj.color], dtype=np.float64)
    if obj.material == "rubber":
        rgb = np.broadcast_to(base * 0.85, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    else:
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        hx, hy = cx - r / 3, cy - r / 3
        d = np.sqrt((xs - hx) ** 2 + (ys - hy) ** 2) / (1.4 * r)
        shade = np.clip(1.05 - 0.6 * d, 0.45, 1.05)[..., None]
        spec = np.clip(1 - d / 0.28, 0, 1)[..., None] * 0.75
        rgb = (base * shade) * (1 - spec) + 255.0 * spec
    return mask, rgb


def render(objects: list[Obj] | tuple[Obj, ...], rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Draw a scene; returns the PIL image and the tight pixel box of every object, keyed by shape."""
    canvas = np.broadcast_to(np.array(BACKGROUND, dtype=np.float64), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for obj in objects:
        mask, rgb = _object_pixels(obj, rng)
        canvas[mask] = rgb[mask]
        ys, xs = np.nonzero(mask)
        boxes[obj.shape] = (
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        )
    canvas += rng.normal(0.0, NOISE_STD, canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB"), boxes


def blank_image(seed: int = 0) -> Image.Image:
    """An all-background image (same noise level as real images, no objects)."""
    image, _ = render([], np.random.default_rng(seed))
    return image


# -------------------------------------------------------------------------------------------- questions


def _choose_attr(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    attribute = _draw_attribute(rng, slot)
    answer = _pick(rng, ATTRIBUTES[attribute], None if slot is None else slot // 4)
    i = int(rng.integers(len(scene)))
    scene[i] = replace(scene[i], **{attribute: answer})
    false = _other_value(rng, attribute, {answer})
    a, b = (answer, false) if rng.random() < 0.5 else (false, answer)
    question = f"Is the {scene[i].shape} {a} or {b}?"
    return question, answer, answer, false, {"central object": scene[i].shape}


def _choose_cat(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    attribute = _draw_attribute(rng, None if slot is None else slot // len(SHAPES))
    answer = _pick(rng, SHAPES, slot)
    if answer not in {o.shape for o in scene}:
        i = int(rng.integers(len(scene)))
        scene[i] = replace(scene[i], shape=answer)
    true_obj = next(o for o in scene if o.shape == answer)
    value = true_obj.attribute(attribute)
    for i, o in enumerate(scene):
        if o.shape != answer and o.attribute(attribute) == value:
            scene[i] = replace(o, **{attribute: _other_value(rng, attribute, {value})})
    others = [o.shape for o in scene if o.shape != answer]
    false = others[int(rng.integers(len(others)))]
    a, b = (answer, false) if rng.random() < 0.5 else (false, answer)
    question = f"Which shape is {value}, the {a} or the {b}?"
    return question, answer, answer, false, {"central object": answer}


def _choose_rel(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    answer = _pick(rng, SIDES, slot)
    subject, reference = (int(i) for i in rng.permutation(len(scene))[:2])
    _place_on_side(rng, scene, subject, answer)
    _place_on_side(rng, scene, reference, "right" if answer == "left" else "left")
    false = "right" if answer == "left" else "left"
    a, b = (answer, false) if rng.random() < 0.5 else (false, answer)
    s, r = scene[subject].shape, scene[reference].shape
    question = f"Is the {s} to the {a} or to the {b} of the {r}?"
    return question, answer, answer, false, {"object1": r, "object2": s}


def _compare_attr(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    answer = _pick(rng, ATTRIBUTES, slot)
    i, j = (int(k) for k in rng.permutation(len(scene))[:2])
    changes: dict[str, str] = {answer: scene[i].attribute(answer)}
    for attribute in ATTRIBUTES:
        if attribute != answer:
            changes[attribute] = _other_value(rng, attribute, {scene[i].attribute(attribute)})
    scene[j] = replace(scene[j], **changes)
    question = f"What do the {scene[i].shape} and the {scene[j].shape} have in common?"
    return question, answer, None, None, {"object1": scene[i].shape, "object2": scene[j].shape}


def _logical_obj(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    answer = _pick(rng, ("yes", "no"), slot)
    attribute = _draw_attribute(rng, None if slot is None else slot // 2)
    present = [o.shape for o in scene]
    if answer == "yes":
        first = present[int(rng.integers(len(present)))]
        second = str(rng.choice([s for s in SHAPES if s != first]))
        value = next(o for o in scene if o.shape == first).attribute(attribute)
    else:
        first, second = (str(s) for s in rng.permutation(SHAPES)[:2])
        unnamed = [o for o in scene if o.shape not in (first, second)]
        if unnamed and rng.random() < 0.5:  # a distractor: the property exists, but on another shape
            value = unnamed[int(rng.integers(len(unnamed)))].attribute(attribute)
        else:
            value = str(rng.choice(ATTRIBUTES[attribute]))
        for i, o in enumerate(scene):
            if o.shape in (first, second) and o.attribute(attribute) == value:
                scene[i] = replace(o, **{attribute: _other_value(rng, attribute, {value})})
    if rng.random() < 0.5:
        first, second = second, first
    question = f"Are there either {first}s or {second}s that are {value}?"
    return question, answer, None, None, {"object1": first, "object2": second}


def _query_attr(rng: np.random.Generator, scene: list[Obj], slot: int | None) -> tuple:
    answer = _pick(rng, SIDES, slot)
    i = int(rng.integers(len(scene)))
    _place_on_side(rng, scene, i, answer)
    question = f"In which part of the image is the {scene[i].shape}?"
    return question, answer, None, None, {"central object": scene[i].shape}


_BUILDERS = {
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
}
#: The six families, in the paper's order (equal to ``mmflow.paper.TASKS``, tested; datasets seed by this order).
TASKS = tuple(_BUILDERS)


def sample(task: str, key: tuple[int, ...] | list[int], slot: int | None = None) -> SceneQuestion:
    """Generate one example of ``task``, fully determined by the integer ``key`` (a numpy seed sequence).

    ``slot`` (the example's index in an evaluation split) cycles the gold answer through the task's answer set,
    and the asked attribute through colour/material/colour/size, so that splits are exactly answer-balanced;
    with ``slot=None`` (training) both are drawn at random.
    """
    rng = np.random.default_rng(np.random.SeedSequence(list(key)))
    scene = random_scene(rng)
    question, answer, true_opt, false_opt, roles = _BUILDERS[task](rng, scene, slot)
    image, boxes = render(scene, rng)
    return SceneQuestion(task, question, answer, true_opt, false_opt, tuple(scene), roles, image, boxes)


# ---------------------------------------------------------------------------------------------- dataset


def example_row(example: SceneQuestion, question_id: str, img_id: str) -> dict:
    """One dataset row with the GQA CSV column names (None where not applicable)."""
    row: dict = {
        "question_id": question_id,
        "img_id": img_id,
        "task": example.task,
        "question": example.question,
        "answer": example.answer,
        "true option": example.true_option,
        "false option": example.false_option,
    }
    for prefix in ROLE_COLUMNS:
        name = example.roles.get(prefix)
        box = example.boxes.get(name) if name is not None else None
        row[f"{prefix} name"] = name
        for k, column in enumerate(BOX_COLUMNS):
            row[f"{prefix} {column}"] = box[k] if box is not None else None
    row["image_w"] = IMAGE_SIZE
    row["image_h"] = IMAGE_SIZE
    row["image"] = example.image
    return row


def dataset_features() -> datasets.Features:
    """The schema of :func:`make_dataset`."""
    features: dict = {
        name: datasets.Value("string")
        for name in ("question_id", "img_id", "task", "question", "answer", "true option", "false option")
    }
    for prefix in ROLE_COLUMNS:
        features[f"{prefix} name"] = datasets.Value("string")
        for column in BOX_COLUMNS:
            features[f"{prefix} {column}"] = datasets.Value("float64")
    features["image_w"] = datasets.Value("int64")
    features["image_h"] = datasets.Value("int64")
    features["image"] = datasets.Image()
    return datasets.Features(features)


def make_dataset(n_per_task: int, seed: int = EVAL_SEED, tasks=TASKS) -> datasets.Dataset:
    """``n_per_task`` questions for each task, one image per question, deterministic in ``seed``."""
    rows = []
    for task in tasks:
        t = TASKS.index(task)
        for i in range(n_per_task):
            ex = sample(task, (seed, t, i), slot=i)
            rows.append(example_row(ex, question_id=f"{seed}-{task}-{i:05d}", img_id=f"{seed}-{t}-{i:05d}"))
    columns = {name: [row[name] for row in rows] for name in dataset_features()}
    return datasets.Dataset.from_dict(columns, features=dataset_features())
