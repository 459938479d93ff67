"""Inputs and caches that cannot be trusted: each bad input gives an error naming the culprit, nothing is written
outside the cache, and processes sharing a cache never fail or corrupt it."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mmflow.cache
import mmflow.figures
import mmflow.identity
import mmflow_utils as mu
from mmflow.data import read_csv_rows
from mmflow.paper import flow_parts

QUERY_COLUMNS = [
    "question_id",
    "img_id",
    "question",
    "answer",
    "central object name",
    "image_w",
    "image_h",
    "central object x",
    "central object y",
    "central object w",
    "central object h",
]
TASK_FILE = "GQA_val_correct_question_with_positionQuery_QueryAttr.csv"


def query_row(qid="1", img="img1", question="Where is the jar?", w="64", h="48", box=("3", "4", "10", "12")):
    return [qid, img, question, "left", "jar", w, h, *box]


@pytest.fixture
def gqa(tmp_path):
    csvs, images = tmp_path / "csv", tmp_path / "images"
    csvs.mkdir(), images.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(images / "img1.jpg")
    return csvs, images


def write(path: Path, rows, columns=QUERY_COLUMNS, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def load(csvs, images, n=None):
    return mu.load_gqa(csvs, images, ["QueryAttr"], n)


# ---------------------------------------------------------------------------------------------------- CSV files


def test_bom_and_embedded_line_breaks_keep_physical_lines(gqa):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row(question="Where is\nthe jar?"), query_row("2", w="wide")], encoding="utf-8-sig")
    with pytest.raises(mu.MmflowError, match=r"QueryAttr.csv line 4: column 'image_w' must be a number, got 'wide'"):
        load(csvs, images)
    (example,) = load(csvs, images, n=1)
    assert example.question == "Where is\nthe jar?" and example.source == f"{TASK_FILE} line 2"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty file"),
        (",".join(QUERY_COLUMNS).encode() + b"\n", "no rows below the header"),
        (
            ",".join(QUERY_COLUMNS).encode() + b"\n1,img1,Where is the caf\xe9?,left,jar,64,48,3,4,10,12\n",
            "is not UTF-8",
        ),
        (b"question_id,img_id,question\n1,img1,Where?\n", r"missing column\(s\) \['answer'"),
    ],
)
def test_malformed_files_are_named(gqa, content, message):
    csvs, images = gqa
    (csvs / TASK_FILE).write_bytes(content)
    with pytest.raises(mu.MmflowError, match=message) as err:
        load(csvs, images)
    assert TASK_FILE in str(err.value)


@pytest.mark.parametrize(
    "cells,message",
    [
        ({"w": "-375"}, "'image_w' and 'image_h' must be positive numbers, got '-375'"),
        ({"h": "inf"}, "column 'image_h' must be a finite number"),
        ({"box": ("3", "4", "0", "12")}, "box of 'central object' must have a positive width"),
        ({"img": "../../etc/passwd"}, "column 'img_id' must be a plain file name"),
        ({"img": "/etc/passwd"}, "column 'img_id' must be a plain file name"),
        ({"img": "a\0b"}, "column 'img_id' must be a plain file name"),
        ({"qid": ""}, "missing value in column 'question_id'"),
    ],
)
def test_bad_cells_are_named_with_their_line(gqa, cells, message):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row(), query_row(**cells)])
    with pytest.raises(mu.MmflowError, match=message) as err:
        load(csvs, images)
    assert f"{TASK_FILE} line 3" in str(err.value)


def test_missing_box_columns_are_an_error_for_patch_analyses_only(gqa, tiny_dirs, tmp_path):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row()[:7]], columns=QUERY_COLUMNS[:7])
    (example,) = load(csvs, images)
    assert example.boxes is None
    run = mu.Run.load(str(tiny_dirs["llava"]), cache_dir=str(tmp_path / "results"))
    run.knockout([example], ["Image->Last"], window=3)  # no patch groups needed
    with pytest.raises(
        mu.MmflowError, match=f"{TASK_FILE} line 2, question_id 1 \\(and 0 more\\): the data has no box columns"
    ):
        run.knockout([example], list(mu.PATCH_FLOWS), window=3)


def test_decompression_bomb_names_the_file(gqa, monkeypatch):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row()])
    (example,) = load(csvs, images)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 48 is then more than twice the limit
    with pytest.raises(mu.MmflowError, match=r"question_id 1 is not a readable image: .*img1.jpg"):
        example.image()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\0\r"), min_size=1), st.integers(1, 5000)),
        min_size=1,
        max_size=6,
    )
)
def test_csv_rows_round_trip_with_physical_lines(tmp_path_factory, rows):
    """Whatever the cells hold (commas, quotes, line breaks, any script), rows come back intact, and each row's
    line is where it starts in the file."""
    path = tmp_path_factory.mktemp("csv") / "x.csv"
    write(path, [[question, str(width)] for question, width in rows], columns=["question", "image_w"])
    starts, line = [], 2  # where each record starts, counted independently of the reader
    for question, width in rows:
        record = io.StringIO()
        csv.writer(record).writerow([question, str(width)])
        starts.append(line)
        line += record.getvalue().count("\n")
    read = list(read_csv_rows(path))
    assert [(r["question"], int(r["image_w"])) for _, r in read] == rows
    assert [line for line, _ in read] == starts


# ------------------------------------------------------------------------------------------------ parsers


@given(st.integers(0, 80), st.integers(1, 81), st.integers(1, 80))
def test_window_layers_properties(centre, k, n_layers):
    centre = centre % n_layers
    window = mu.window_layers(centre, k, n_layers)
    assert centre in window and window.start >= 0 and window.stop <= n_layers and len(window) <= k
    if k // 2 <= centre < n_layers - k // 2:  # away from the edges the window is whole
        assert len(window) == k


@given(st.text(st.characters(exclude_characters="->"), min_size=1), st.text(st.characters(exclude_characters="->")))
def test_flow_parts_splits_on_the_first_arrow(source, target):
    assert flow_parts(f"{source}->{target}") == (source.strip(), target.strip())


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def folder(tiny_dirs, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["llava"], copy)
    return copy


def test_remote_code_is_never_run(folder, tmp_path):
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    for model_type in (config["model_type"], "evil"):
        (folder / "config.json").write_text(
            json.dumps({**config, "model_type": model_type, "auto_map": {"AutoConfig": "evil.EvilConfig"}})
        )
        with pytest.raises(mu.MmflowError, match="asks for custom code"):
            mu.load_model(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "config.json").write_text("{not json"), "config.json does not parse as JSON"),
        (lambda f: (f / "config.json").unlink(), "holds no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "holds no weights"),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
            "is truncated",
        ),
        (lambda f: (f / "preprocessor_config.json").unlink(), "lacks its processor"),
    ],
)
def test_broken_checkpoints_are_named_before_loading_weights(folder, damage, message):
    if not (folder / "preprocessor_config.json").exists():
        (folder / "processor_config.json").rename(folder / "preprocessor_config.json")
    damage(folder)
    with pytest.raises(mu.MmflowError, match=message):
        mu.load_model(str(folder))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"dtype": "bogus"}, "dtype must be one of"),
        ({"device": "gpu9"}, "device must be a torch device"),
        ({"name_or_path": "./no/such/folder"}, r"Model folder ./no/such/folder \(/.*/no/such/folder\) not found"),
    ],
)
def test_bad_load_parameters_are_named(kwargs, message):
    with pytest.raises(mu.MmflowError, match=message):
        mu.load_model(**kwargs)


# ------------------------------------------------------------------------------------------------ the cache


def odd_id_examples():
    image = Image.new("RGB", (70, 50), (40, 90, 200))
    ids = ["../../escape", "/srv/pwn", "sub/dir", "nul\0byte", "new\nline"]
    return [
        mu.Example(
            i,
            "ChooseAttr",
            "Is the square red or blue?",
            "zzz",
            (70, 50),
            ["square"],
            [(5.0, 4.0, 20.0, 20.0)],
            "red",
            "blue",
            _image=image,
        )
        for i in ids
    ]


def test_ids_from_the_data_never_name_files(tiny_dirs, tmp_path):
    cache = tmp_path / "cache"
    run = mu.Run.load(str(tiny_dirs["llava"]), cache_dir=str(cache))
    _, status = run.knockout(odd_id_examples(), ["Image->Last"], window=3)
    assert status.example_id.tolist() == [e.example_id for e in odd_id_examples()]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != cache / mmflow.identity.INDEX_FILE]
    assert written and all(p.is_relative_to(cache) and len(p.stem) == 64 for p in written)


def hammer(cache_dir: str, seed: int) -> int:
    """Write and read the same few results many times; returns the number of bad reads."""
    cache = mmflow.cache.ResultCache(cache_dir, "race")
    digests = [f"{d:064x}" for d in range(3)]
    bad = 0
    for i in range(150):
        digest = digests[(i + seed) % 3]
        cache.write(digest, {"rows": [{"i": i}] * 50, "writer": seed})
        result = cache.read(digest)
        bad += result is None or len(result["rows"]) != 50
    return bad


def test_two_processes_share_a_cache(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        bad = pool.starmap(hammer, [(str(tmp_path), 0), (str(tmp_path), 1)])
    assert bad == [0, 0]
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == [f"{d:064x}.json" for d in range(3)]


# ------------------------------------------------------------------------------------------------ figures


def test_stable_table_keeps_saved_numbers_within_the_stated_tolerance(tmp_path):
    table = pd.DataFrame(
        {"task": ["A", "A"], "flow": ["x", "x"], "layer": [0, 1], "mean": [-89.4220091, 0.1152], "n": [40, 40]}
    )
    table.to_csv(tmp_path / "fig.csv", index=False, float_format="%.6f")
    saved = pd.read_csv(tmp_path / "fig.csv")
    close = table.assign(mean=table["mean"] + 4.6e-5)
    assert mmflow.figures.stable_table(close, tmp_path, "fig").equals(saved)
    far = table.assign(mean=table["mean"] + 0.01)
    assert mmflow.figures.stable_table(far, tmp_path, "fig")["mean"].tolist() == [-89.412009, 0.1252]
    assert mmflow.figures.stable_table(table.assign(flow="y"), tmp_path, "fig")["flow"].tolist() == ["y", "y"]


def test_a_first_run_draws_the_numbers_a_rerun_reads(tmp_path):
    """Without a saved CSV the table comes back with its floats as saved, so the first run's figure and a rerun's
    (which draws the saved numbers) are the same bytes."""
    import matplotlib.pyplot as plt

    table = pd.DataFrame({"flow": ["x"] * 3, "layer": [0, 1, 2], "mean": [-89.42200913, 0.11523456789, 1 / 3]})
    first = mmflow.figures.stable_table(table, tmp_path, "fig")
    assert first["mean"].tolist() == [-89.422009, 0.115235, 0.333333] and first["layer"].tolist() == [0, 1, 2]
    images = []
    for _ in range(2):
        data = mmflow.figures.stable_table(table, tmp_path, "fig")
        fig, ax = plt.subplots()
        ax.plot(data["layer"], data["mean"])
        mmflow.figures.save_figure(fig, data, tmp_path, "fig")
        plt.close(fig)
        images.append((tmp_path / "fig.png").read_bytes())
    assert images[0] == images[1]


def test_overview_refuses_figures_of_another_model(tmp_path):
    mu.record_provenance(tmp_path, mu.FIG_TO_LAST, model="shapes-llava", data="shapes")
    mu.check_provenance(tmp_path, [mu.FIG_TO_LAST], "shapes-llava", "shapes")
    with pytest.raises(mu.MmflowError, match="fig1_to_last.csv was computed on data 'shapes', not '/data/gqa'"):
        mu.check_provenance(tmp_path, [mu.FIG_TO_LAST], "shapes-llava", "/data/gqa")
    with pytest.raises(mu.MmflowError, match="fig1_to_last.csv was computed for model 'shapes-llava', not 'llava-hf"):
        mu.check_provenance(tmp_path, [mu.FIG_TO_LAST], "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(mu.MmflowError, match="fig4_answer_casing.csv has no entry"):
        mu.check_provenance(tmp_path, [mu.FIG_CASING], "shapes-llava")
