"""Check a data set against a checkpoint before spending GPU hours: ``make check-data MODEL=... DATA=... IMAGES=...``.

Reads only the checkpoint's config and processor (no weights: the patch geometry comes from a weightless skeleton
on the meta device), and for every row of the paper's CSVs: is the row well formed, is its image there and of the
stated size, where are its options and objects in the question (and by which rule), how many image tokens are
related / other patches, and would a flow be skipped; is a question_id used twice (a run refuses that); what does
the image conversion change (alpha, 16-bit scaling, EXIF orientation: :mod:`mmflow.images`) and which boxes reach
past the image. Prints a per-task table and every row that would be skipped or has a note, with its file, line and
reason.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.data import iter_gqa, parse_n
from mmflow.errors import MmflowError
from mmflow.images import box_issues
from mmflow.inputs import encode_example, resolve_inputs
from mmflow.models import load_processor
from mmflow.paper import TASKS

#: Columns of the per-task summary.
SUMMARY_COLUMNS = (
    "task",
    "rows",
    "usable",
    "skipped",
    "options in slot",
    "objects found",
    "objects by rule",
    "no related patches",
    "median related tokens",
)


def check_rows(
    model: str, data: str, images: str, tasks: Sequence[str] = TASKS, n: int | None = None, inputs: str | None = None
) -> pd.DataFrame:
    """One record per CSV row: ``task, location, question_id, usable, reason, notes, options, objects, related,
    other``.

    ``usable`` is False, with the ``reason``, for a malformed row, a missing, unreadable, refused or wrongly sized
    image, a box outside the image, a question_id another row also uses, or an input that cannot be built; option
    and object locations that fail are noted (no notebook flow needs them). ``notes`` says what the image
    conversion changes and which boxes are clipped by more than :data:`~mmflow.images.BOX_EDGE_SLACK` pixels.
    """
    skeleton, processor = load_processor(model)
    mode = resolve_inputs(inputs, model)
    records: list[dict[str, Any]] = []
    for task, where, example, error in iter_gqa(data, images, tasks, n):
        record = {
            "task": task,
            "location": where,
            "question_id": example.example_id if example else None,
            "usable": False,
            "reason": str(error) if error else "",
            "notes": "",
            "options": "",
            "objects": "",
            "related": None,
            "other": None,
        }
        if example is not None:
            try:
                record["notes"] = "; ".join(box_issues(example.image_size, example.boxes, example.box_columns)[1])
                example, notes = example.decoded()
                record["notes"] = "; ".join(notes + ([record["notes"]] if record["notes"] else []))
                patches = example.boxes is not None
                encoded = encode_example(processor, example, model=skeleton, inputs=mode, patches=patches)
            except MmflowError as err:
                record["reason"] = str(err)
            else:
                located = encoded.located
                record.update(
                    usable=True,
                    options=located.get("true_option", ""),
                    objects="; ".join(
                        f"{k.split(':', 1)[1]}: {v}" for k, v in located.items() if k.startswith("object:")
                    ),
                    related=len(encoded.groups.get("related_patches", [])),
                    other=len(encoded.groups.get("other_patches", [])),
                )
                if patches and not record["related"]:
                    record["reason"] = "Related patches->Question would be skipped: no image token shows the objects"
                elif not patches:
                    record["reason"] = "no box columns: the patch flows cannot run"
        records.append(record)
    flag_duplicate_ids(records)
    return pd.DataFrame(records)


def flag_duplicate_ids(records: list[dict[str, Any]]) -> None:
    """Mark every record whose question_id another record also uses (in any file) not usable, naming the other
    places: a run refuses such data (:func:`mmflow.cache.check_unique_ids`), since one result would replace the
    other in every table.

    Example:
        >>> records = [{"question_id": "7", "location": f"a.csv line {i}", "usable": True, "reason": ""} for i in "25"]
        >>> flag_duplicate_ids(records)
        >>> records[1]["usable"], records[1]["reason"]
        (False, "question_id '7' is also used at a.csv line 2: a run refuses duplicate ids")
    """
    places = defaultdict(list)
    for record in records:
        if record["question_id"] is not None:
            places[record["question_id"]].append(record["location"])
    for record in records:
        others = [p for p in places.get(record["question_id"], []) if p != record["location"]]
        if others:
            reason = f"question_id {record['question_id']!r} is also used at {', '.join(others)}: a run refuses "
            reason += "duplicate ids" + (f"; {record['reason']}" if record["reason"] else "")
            record.update(usable=False, reason=reason)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per task: rows, usable and skipped rows, options found in their "X or Y" slot, objects found (and by which
    rule), rows without related patches, median related tokens."""
    out = []
    for task, part in rows.groupby("task", sort=False):
        usable = part[part.usable]
        objects = usable.objects.str.split("; ").explode()
        objects = objects[objects.fillna("").str.len() > 0]
        rules = objects.str.split(": ", n=1).str[1]
        with_options = usable[usable.options != ""]
        out.append(
            {
                "task": task,
                "rows": len(part),
                "usable": len(usable),
                "skipped": len(part) - len(usable),
                "options in slot": f"{with_options.options.str.startswith('or-slot').sum()}/{len(with_options)}"
                if len(with_options)
                else "-",
                "objects found": f"{(rules != 'not found').sum()}/{len(rules)}",
                "objects by rule": ", ".join(f"{rule} {n}" for rule, n in rules.value_counts().items()),
                "no related patches": int((usable.related == 0).sum()),
                "median related tokens": float(usable.related.median())
                if usable.related.notna().any()
                else float("nan"),
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 0 if every row is usable, 1 if some would be skipped, 2 on an error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id or checkpoint folder (only config + processor are read)")
    parser.add_argument("--data", required=True, help="folder of the paper's GQA CSVs")
    parser.add_argument("--images", required=True, help="GQA image folder")
    parser.add_argument("--n", default="", help="rows per task (empty or 0: all)")
    parser.add_argument("--inputs", default="", help="paper or processor (empty: the default for the model)")
    parser.add_argument("--out", type=Path, help="also write every row's record to this CSV")
    args = parser.parse_args(argv)
    try:
        rows = check_rows(args.model, args.data, args.images, n=parse_n(args.n), inputs=args.inputs or None)
    except MmflowError as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(summary(rows).to_string(index=False))
        flagged = rows[(rows.reason != "") | (rows.notes != "")]
        if len(flagged):
            print(f"\n{len(flagged)} rows to look at (skipped, a flow that would be skipped, or a note):")
            for record in flagged.itertuples():
                said = [record.reason] if record.reason else []
                said += [f"note: {record.notes}"] if record.notes else []
                print(f"  {record.location} (question_id {record.question_id}): {'; '.join(said)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(args.out, index=False)
    print(f"check-data: {len(rows)} rows, {int(rows.usable.sum())} usable, {int((~rows.usable).sum())} skipped")
    return 0 if rows.usable.all() else 1


if __name__ == "__main__":
    sys.exit(main())
