"""GQA-like fixtures: the six CSVs with the paper's exact headers and quirks (line breaks inside quoted caption
cells, '-' for a missing second object, leading-zero ids, sub-word options, repeated object names), and images of
the stated sizes. Built here because tests must not depend on ../shared."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

HEADERS = {
    "categoryThatThisChoose_objThisChoose_ChooseCat": "question_id,img_id,question,answer,true option,false option,"
    "central object name,central object id,type_detailed,type_semantic,type_structural,operations,captions,image_w,"
    "image_h,central object w,central object h,central object x,central object y",
    "choose_ChooseAttr": "question_id,img_id,question,answer,true option,false option,central object name,"
    "central object id,central object attributes,central object question attribute,all objects,"
    "all objects attributes,type_detailed,type_semantic,type_structural,operations,operation_1,operation_2,captions,"
    "image_w,image_h,central object w,central object h,central object x,central object y,full answer",
    "existThatOr_LogicalObj": "question_id,img_id,question,answer,object1 name,object1 id,object2 name,object2 id,"
    "question word,type_detailed,type_semantic,type_structural,operations,captions,image_w,image_h,object1 w,"
    "object1 h,object1 x,object1 y,object2 w,object2 h,object2 x,object2 y",
    "positionQuery_QueryAttr": "question_id,img_id,question,answer,central object name,central object id,"
    "question word,type_detailed,type_semantic,type_structural,operations,captions,image_w,image_h,central object w,"
    "central object h,central object x,central object y",
    "relChooser_ChooseRel": "question_id,img_id,question,answer,true option,false option,object1 name,object1 id,"
    "object2 name,object2 id,type_detailed,type_semantic,type_structural,operations,captions,image_w,image_h,"
    "object1 w,object1 h,object1 x,object1 y,object2 w,object2 h,object2 x,object2 y",
    "twoCommon_CompareAttr": "question_id,img_id,question,answer,object1 name,object1 id,object2 name,object2 id,"
    "question word,type_detailed,type_semantic,type_structural,operations,captions,image_w,image_h,object1 w,"
    "object1 h,object1 x,object1 y,object2 w,object2 h,object2 x,object2 y",
}
CAPTION = "a grey wood tree trunk.\ntrunk of a tree, dark feathers"  # a line break inside a quoted cell
OPS = "[{'operation': 'select', 'dependencies': [], 'argument': 'x (1)'}]"
# (question, answer, true option, false option, objects [(name, box or None)], image size)
ROWS = {
    "ChooseCat": [
        (
            "Which kind of device is this, a telephone or a laptop?",
            "phone",
            "phone",
            "laptop",
            [("device", (10, 20, 80, 60))],
            (200, 150),
        ),
        (
            "Are these elephants or giraffes?",
            "elephant",
            "elephant",
            "giraffe",
            [("animal", (0, 0, 150, 100))],
            (150, 200),
        ),
    ],
    "ChooseAttr": [
        ("Is the red car red or blue?", "red", "red", "blue", [("car", (150, 10, 40, 30))], (200, 120)),
        ("Is the jar full or empty?", "empty", "empty", "full", [("jar", (5, 5, 20, 30))], (120, 200)),
    ],
    "ChooseRel": [
        (
            "Is the skateboarder to the left or to the right of the skateboard?",
            "right",
            "right",
            "left",
            [("skateboard", (10, 60, 30, 10)), ("skateboarder", (60, 10, 30, 60))],
            (160, 100),
        ),
        (
            "Is the carpet to the left or to the right of the car?",
            "left",
            "left",
            "right",
            [("car", (100, 40, 50, 30)), ("carpet", (0, 60, 60, 30))],
            (160, 100),
        ),
        (  # a repeated object name, as in GQA's "the other car"
            "Is the car on the left or on the right of the other car?",
            "right",
            "right",
            "left",
            [("car", (10, 40, 40, 20)), ("car", (110, 40, 40, 20))],
            (160, 100),
        ),
    ],
    "CompareAttr": [
        (
            "What do the men and the women have in common?",
            "color",
            None,
            None,
            [("man", (0, 0, 40, 90)), ("woman", (50, 0, 40, 90))],
            (100, 100),
        ),
        (
            "What do the marker and the post have in common?",
            "color",
            None,
            None,
            [("marker", (0, 0, 10, 10)), ("post", (20, 20, 10, 50))],
            (100, 80),
        ),
    ],
    "LogicalObj": [
        (
            "Is there any grass or mud that is not brown?",
            "no",
            None,
            None,
            [("grass", (0, 50, 100, 30)), ("mud", None)],
            (100, 80),
        ),
        (
            "Are there both doors and windows?",
            "yes",
            None,
            None,
            [("door", (5, 5, 20, 40)), ("window", (60, 5, 30, 30))],
            (100, 80),
        ),
    ],
    "QueryAttr": [
        (
            "On which side of the photo is the curtain?",
            "right",
            None,
            None,
            [("curtain", (170, 0, 30, 100))],
            (200, 100),
        ),
        ("On which side is the man?", "left", None, None, [("man", (0, 0, 30, 30))], (400, 100)),
    ],
}


def _row(header: list[str], qid: str, img: str, spec) -> list[str]:
    question, answer, true_opt, false_opt, objects, (w, h) = spec
    cells = {
        "question_id": qid,
        "img_id": img,
        "question": question,
        "answer": answer,
        "true option": true_opt or "",
        "false option": false_opt or "",
        "operations": OPS,
        "captions": CAPTION,
        "image_w": str(w),
        "image_h": str(h),
        "full answer": f"The answer is {answer}.",
    }
    prefixes = ["central object"] if "central object name" in header else ["object1", "object2"]
    for prefix, (name, box) in zip(prefixes, objects):
        cells[f"{prefix} name"], cells[f"{prefix} id"] = name, "-" if box is None else "123"
        for key, value in zip("xywh", box or ("-",) * 4):
            cells[f"{prefix} {key}"] = str(value)
    return [cells.get(column, "-") for column in header]


def build_gqa(root: Path) -> tuple[Path, Path, int]:
    """Write the six CSVs and their images under ``root``; returns (csv folder, image folder, number of rows)."""
    csvs, images = root / "gqa_csvs", root / "images"
    csvs.mkdir(parents=True), images.mkdir(parents=True)
    total = 0
    for suffix, header_text in HEADERS.items():
        header = header_text.split(",")
        task = suffix.rsplit("_", 1)[1]
        with (csvs / f"GQA_val_correct_question_with_{suffix}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for i, spec in enumerate(ROWS[task]):
                img = f"{task.lower()}{i}"
                Image.new("RGB", spec[-1], (30 + 40 * i, 90, 160)).save(images / f"{img}.jpg")
                writer.writerow(_row(header, f"0{1000 + total}", img, spec))  # leading zero, as in GQA
                total += 1
    return csvs, images, total
