"""Data: one :class:`Example` type for the embedded shapes world and the paper's GQA CSVs + image folder."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from mmflow.errors import MmflowError
from mmflow.images import box_error, conversion_notes, read_rgb, to_rgb
from mmflow.paper import CHOOSE_TASKS, OBJECT_COLUMNS, TASKS

EMBEDDED_DATA = "shapes"
#: Questions per task of the embedded shapes world when ``n`` is not given (GQA: every row).
DEFAULT_SHAPES_PER_TASK = 40


@dataclass
class Example:
    """One question about one image, with the boxes of the objects it is about (original-image pixels)."""

    example_id: str
    task: str
    question: str
    answer: str
    image_size: tuple[int, int]  # (W, H)
    objects: list[str] = field(default_factory=list)
    #: (x, y, w, h) per object found in the data; None if the data has no box columns at all
    boxes: list[tuple[float, float, float, float]] | None = field(default_factory=list)
    true_option: str | None = None
    false_option: str | None = None
    image_path: str | None = None
    _image: Image.Image | None = field(default=None, repr=False)
    #: where the example comes from, for messages (e.g. "x.csv line 7")
    source: str = field(default="", compare=False)
    #: the folder ``image_path`` must lie in, links resolved (the GQA image folder); None: not confined
    image_dir: str | None = field(default=None, compare=False, repr=False)
    #: the CSV column prefix of each box, for messages (e.g. "object1"); empty: boxes are named by their number
    box_columns: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def where(self) -> str:
        """The example for a message: its source if known, and its id."""
        return f"{self.source}, question_id {self.example_id}" if self.source else f"example {self.example_id}"

    @property
    def options(self) -> tuple[str, ...]:
        """(true, false) options of a Choose question, else empty."""
        return (self.true_option, self.false_option) if self.true_option and self.false_option else ()

    def image(self) -> Image.Image:
        """The RGB image (loaded from ``image_path`` on demand), converted by :func:`mmflow.images.to_rgb`.

        Raises:
            MmflowError: naming the example and the file if it is missing, unreadable, of a refused mode, or leads
                outside ``image_dir``.
        """
        if self._image is not None:
            return to_rgb(self._image, f"Image of {self.where}")
        root = Path(self.image_dir) if self.image_dir is not None else None
        return read_rgb(Path(str(self.image_path)), f"Image of {self.where}", root)[0]

    def decoded(self) -> tuple[Example, list[str]]:
        """This example with its image decoded and held, and where the conversion changed something
        (:func:`mmflow.images.conversion_notes`: what ``make check-data`` lists).

        Raises:
            MmflowError: as :meth:`image`.
        """
        if self._image is not None:
            return replace(self, _image=self.image()), conversion_notes(self._image)
        root = Path(self.image_dir) if self.image_dir is not None else None
        image, notes = read_rgb(Path(str(self.image_path)), f"Image of {self.where}", root)
        return replace(self, _image=image), notes

    def with_image(self) -> Example:
        """This example with its image decoded and held, so that its digest and its computation decode it once;
        itself if the image is held already or cannot be read (its digest and computation then say so)."""
        if self._image is not None or self.image_path is None:
            return self
        try:
            return replace(self, _image=self.image())
        except MmflowError:
            return self

    def digest(self) -> str:
        """A content hash of the example: every field that can change a result, and the image's pixels.

        Two examples with the same digest give the same results on the same model, wherever their files live;
        an edited question or a replaced image gives a new digest. A missing or unreadable image is hashed as
        such (with its path), so its recorded failure is redone once the image is there.
        """
        try:
            image = self.image()
            pixels = {
                "image": hashlib.sha256(image.tobytes()).hexdigest(),
                "mode": image.mode,
                "size": list(image.size),
            }
        except MmflowError:
            pixels = {"unreadable image": str(self.image_path)}
        fields = {
            "example_id": self.example_id,
            "task": self.task,
            "question": self.question,
            "answer": self.answer,
            "image_size": list(self.image_size),
            "objects": self.objects,
            "boxes": None if self.boxes is None else [list(b) for b in self.boxes],
            "true_option": self.true_option,
            "false_option": self.false_option,
            **pixels,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _number(row: Mapping[str, Any], column: str, where: str) -> float | None:
    """A numeric CSV cell; None for an empty/'-'/None cell, a MmflowError naming the cell if malformed."""
    value = row.get(column)
    if value is None or str(value).strip() in ("", "-", "None", "nan"):
        return None
    try:
        number = float(value)
    except ValueError as err:
        raise MmflowError(f"{where}: column '{column}' must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise MmflowError(f"{where}: column '{column}' must be a finite number, got {value!r}")
    return number


def example_from_row(
    row: Mapping[str, Any], task: str, where: str, image_path: str | None = None, image: Image.Image | None = None
) -> Example:
    """Build an :class:`Example` from a row with the GQA CSV columns (shapes rows use the same names).

    Args:
        row: the row, column name to cell.
        task: one of :data:`~mmflow.paper.TASKS`.
        where: where the row comes from, for error messages (e.g. ``"x.csv line 7"``).
        image_path: the image file, or
        image: the image itself.

    Raises:
        MmflowError: naming ``where`` and the column for a missing or malformed cell.
    """
    if task not in OBJECT_COLUMNS:
        raise MmflowError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    for column in ("question_id", "question", "answer"):
        if not str(row.get(column) or "").strip():
            raise MmflowError(f"{where}: missing value in column '{column}'")
    width, height = _number(row, "image_w", where), _number(row, "image_h", where)
    if not width or not height or width < 1 or height < 1:
        raise MmflowError(
            f"{where}: columns 'image_w' and 'image_h' must be positive numbers, got "
            f"{row.get('image_w')!r} and {row.get('image_h')!r}"
        )
    objects, boxes, columns = [], [], []
    has_box_columns = any(f"{prefix} {c}" in row for prefix in OBJECT_COLUMNS[task] for c in "xywh")
    for prefix in OBJECT_COLUMNS[task]:
        name = str(row.get(f"{prefix} name") or "").strip()
        if name:
            objects.append(name)
        coords = [_number(row, f"{prefix} {c}", where) for c in "xywh"]
        if all(c is not None for c in coords):
            problem = box_error(tuple(coords))
            if problem:
                qid = str(row.get("question_id")).strip()
                raise MmflowError(
                    f"{where}, question_id {qid}: column '{prefix} {problem[0]}': box of '{prefix}' {problem[1]}"
                )
            boxes.append(tuple(coords))
            columns.append(prefix)
        elif any(c is not None for c in coords):
            raise MmflowError(f"{where}: incomplete box for '{prefix}' ({dict(zip('xywh', coords))})")
    true_opt, false_opt = (str(row.get(c) or "").strip() or None for c in ("true option", "false option"))
    if task in CHOOSE_TASKS and not (true_opt and false_opt):
        raise MmflowError(f"{where}: a {task} question needs 'true option' and 'false option'")
    return Example(
        example_id=str(row["question_id"]),
        task=task,
        question=str(row["question"]).strip(),
        answer=str(row["answer"]).strip(),
        image_size=(int(width), int(height)),
        objects=objects,
        boxes=boxes if has_box_columns else None,
        true_option=true_opt if task in CHOOSE_TASKS else None,
        false_option=false_opt if task in CHOOSE_TASKS else None,
        image_path=image_path,
        _image=image,
        source=where,
        box_columns=tuple(columns),
    )


def gqa_csv_path(csv_dir: str | Path, task: str) -> Path:
    """The paper's CSV of a task in ``csv_dir`` (file names end in ``_<Task>.csv``)."""
    matches = sorted(Path(csv_dir).glob(f"*_{task}.csv"))
    if len(matches) != 1:
        raise MmflowError(f"Expected one file '*_{task}.csv' in {csv_dir}, found {len(matches)}")
    return matches[0]


def _required_columns(task: str) -> list[str]:
    columns = ["question_id", "img_id", "question", "answer", "image_w", "image_h"]
    columns += ["true option", "false option"] if task in CHOOSE_TASKS else []
    return columns + [f"{prefix} name" for prefix in OBJECT_COLUMNS[task]]


def image_file(image_dir: str | Path, img_id: str, where: str) -> Path:
    """The image ``<image_dir>/<img_id>.jpg``, with ``img_id`` confined to a plain file name (a symbolic link that
    leads outside ``image_dir`` is refused when the image is read: :func:`mmflow.images.confined`).

    Raises:
        MmflowError: naming ``where`` for an id with a path separator, ``..``, a NUL byte, or nothing at all.

    Example:
        >>> image_file("images", "2354786", "x.csv line 2").as_posix()
        'images/2354786.jpg'
    """
    if not img_id or img_id in (".", "..") or any(c in img_id for c in "/\\\0"):
        raise MmflowError(f"{where}: column 'img_id' must be a plain file name (no path, '..' or NUL), got {img_id!r}")
    return Path(image_dir) / f"{img_id}.jpg"


def read_csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a CSV as dicts, each with the file's physical line on which it starts.

    Reads UTF-8 with or without a byte-order mark; quoted cells may hold line breaks.

    Raises:
        MmflowError: naming the file for a wrong encoding, a missing header, no rows, or a row with the wrong
            number of fields (with its line).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise MmflowError(f"{path}: empty file (no header row)")
            line, rows = reader.line_num + 1, 0
            for record in reader:
                start, line = line, reader.line_num + 1
                if not record:
                    continue
                if len(record) != len(header):
                    raise MmflowError(
                        f"{path.name} line {start}: wrong number of fields "
                        f"({len(record)}, the header has {len(header)})"
                    )
                rows += 1
                yield start, dict(zip(header, record))
            if not rows:
                raise MmflowError(f"{path}: no rows below the header")
    except UnicodeDecodeError as err:
        raise MmflowError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from err
    except csv.Error as err:
        raise MmflowError(f"{path}: not a readable CSV ({err})") from err


def iter_gqa(
    csv_dir: str | Path, image_dir: str | Path, tasks: Sequence[str] = TASKS, n: int | None = None
) -> Iterator[tuple[str, str, Example | None, MmflowError | None]]:
    """Every row of the paper's GQA CSVs (the first ``n`` per task if given), each as ``(task, where, example,
    error)``: the example, or the reason the row cannot become one (``where`` = file and physical line).

    Raises:
        MmflowError: for a problem with a whole file (missing, not UTF-8, empty, missing columns, broken CSV).
    """
    for task in tasks:
        path = gqa_csv_path(csv_dir, task)
        for i, (line, row) in enumerate(read_csv_rows(path)):
            if i == 0:
                missing = [c for c in _required_columns(task) if c not in row]
                if missing:
                    raise MmflowError(f"{path}: missing column(s) {missing} for {task}")
            if n is not None and i >= n:
                break
            where = f"{path.name} line {line}"
            try:
                image_path = image_file(image_dir, str(row.get("img_id", "")).strip(), where)
                example = example_from_row(row, task, where, image_path=str(image_path))
                yield task, where, replace(example, image_dir=str(image_dir)), None
            except MmflowError as err:
                yield task, where, None, err


def load_gqa(
    csv_dir: str | Path, image_dir: str | Path, tasks: Sequence[str] = TASKS, n: int | None = None
) -> list[Example]:
    """The first ``n`` questions per task (all if None) from the paper's GQA CSVs, images ``image_dir/<img_id>.jpg``.

    An image is read when the example is encoded: a missing or unreadable one is recorded for that example by the
    runs (and listed by ``make check-data``), not fatal here.

    Raises:
        MmflowError: naming the file, physical line and cell of the first malformed row; nothing is dropped.
    """
    examples = []
    for _, _, example, error in iter_gqa(csv_dir, image_dir, tasks, n):
        if error is not None:
            raise error
        examples.append(example)
    return examples


def load_shapes(
    n: int = DEFAULT_SHAPES_PER_TASK, seed: int | None = None, tasks: Sequence[str] = TASKS
) -> list[Example]:
    """``n`` questions per task from the embedded shapes world (its fixed evaluation split unless ``seed``)."""
    from shapes_world import world

    dataset = world.make_dataset(n, world.EVAL_SEED if seed is None else seed, tasks=tuple(tasks))
    return [example_from_row(row, row["task"], f"shapes row {i}", image=row["image"]) for i, row in enumerate(dataset)]


def parse_n(text: str) -> int | None:
    """The ``N`` of ``make`` (questions per task): empty or ``0`` means the default (None).

    Raises:
        MmflowError: naming ``N`` for anything but a non-negative integer.

    Example:
        >>> parse_n(""), parse_n("0"), parse_n(" 7 ")
        (None, None, 7)
    """
    text = str(text).strip()
    if text in ("", "0"):
        return None
    if not text.isdigit():
        raise MmflowError(
            f"N (questions per task) must be a non-negative integer (0 or empty: the default), got {text!r}"
        )
    return int(text)


def load_examples(
    data: str = EMBEDDED_DATA,
    images: str | None = None,
    tasks: Sequence[str] = TASKS,
    n: int | None = None,
    seed: int | None = None,
) -> list[Example]:
    """Examples from the embedded shapes world or a folder of the paper's GQA CSVs.

    Args:
        data: ``"shapes"`` or a folder of the paper's CSVs.
        images: the GQA image folder (GQA only).
        tasks: which tasks, in this order.
        n: questions per task; None: :data:`DEFAULT_SHAPES_PER_TASK` on shapes, every row on GQA.
        seed: the shapes world's split seed (None: the fixed evaluation split).

    Raises:
        MmflowError: for an unknown task, a bad ``n``, a missing data or image folder, or any malformed row.

    Example:
        >>> [e.task for e in load_examples("shapes", n=1, tasks=["QueryAttr", "ChooseRel"])]
        ['QueryAttr', 'ChooseRel']
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MmflowError(f"Unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise MmflowError(f"n (questions per task) must be a positive integer or None (the default), got {n!r}")
    if data == EMBEDDED_DATA:
        return load_shapes(n or DEFAULT_SHAPES_PER_TASK, seed, tasks)
    if not Path(data).is_dir():
        raise MmflowError(
            f"Data folder {data} ({Path(data).resolve()}) not found: pass 'shapes' or a folder of GQA CSVs"
        )
    if not images:
        raise MmflowError("GQA data needs an image folder (IMAGES=... / images=...)")
    if not Path(images).expanduser().is_dir():
        raise MmflowError(f"images {images!r} ({Path(images).expanduser().absolute()}) is not a folder")
    return load_gqa(data, images, tasks, n)
