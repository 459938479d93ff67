"""GQA CSV loading (clear errors, nothing dropped) and cached, resumable, shardable experiment runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mmflow.runs
import mmflow_utils as mu

CHOOSE_ATTR_COLUMNS = [
    "question_id",
    "img_id",
    "question",
    "answer",
    "true option",
    "false option",
    "central object name",
    "central object id",
    "image_w",
    "image_h",
    "central object w",
    "central object h",
    "central object x",
    "central object y",
]
REL_COLUMNS = [
    "question_id",
    "img_id",
    "question",
    "answer",
    "true option",
    "false option",
    "object1 name",
    "object1 id",
    "object2 name",
    "object2 id",
    "image_w",
    "image_h",
    "object1 w",
    "object1 h",
    "object1 x",
    "object1 y",
    "object2 w",
    "object2 h",
    "object2 x",
    "object2 y",
]


def write_csv(path, columns, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


@pytest.fixture
def gqa(tmp_path):
    csvs, images = tmp_path / "csv", tmp_path / "images"
    csvs.mkdir(), images.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(images / "img1.jpg")
    write_csv(
        csvs / "GQA_val_correct_question_with_choose_ChooseAttr.csv",
        CHOOSE_ATTR_COLUMNS,
        [
            [
                "101",
                "img1",
                "Is the jar full or empty?",
                "empty",
                "empty",
                "full",
                "jar",
                "5",
                "64",
                "48",
                "10",
                "12",
                "3",
                "4",
            ],
        ],
    )
    write_csv(
        csvs / "GQA_val_correct_question_with_relChooser_ChooseRel.csv",
        REL_COLUMNS,
        [
            [
                "201",
                "img1",
                "Is the surfer to the left or to the right of the surfboard?",
                "right",
                "right",
                "left",
                "surfboard",
                "7",
                "surfer",
                "8",
                "64",
                "48",
                "20",
                "10",
                "1",
                "2",
                "5",
                "6",
                "40",
                "30",
            ],
        ],
    )
    return csvs, images


def test_load_gqa(gqa):
    csvs, images = gqa
    examples = mu.load_examples(str(csvs), str(images), tasks=["ChooseAttr", "ChooseRel"])
    attr, rel = examples
    assert (attr.task, attr.answer, attr.options, attr.objects, attr.boxes) == (
        "ChooseAttr",
        "empty",
        ("empty", "full"),
        ["jar"],
        [(3.0, 4.0, 10.0, 12.0)],
    )
    assert rel.objects == ["surfboard", "surfer"] and rel.boxes == [(1.0, 2.0, 20.0, 10.0), (40.0, 30.0, 5.0, 6.0)]
    assert attr.image().size == (64, 48) == attr.image_size


def test_gqa_errors_name_the_culprit(gqa):
    csvs, images = gqa
    path = csvs / "GQA_val_correct_question_with_choose_ChooseAttr.csv"
    rows = list(csv.reader(path.open()))
    rows[1][-2] = "wide"  # a malformed box coordinate
    write_csv(path, rows[0], rows[1:])
    with pytest.raises(
        mu.MmflowError, match="ChooseAttr.csv line 2: column 'central object x' must be a number, got 'wide'"
    ):
        mu.load_gqa(csvs, images, ["ChooseAttr"])
    write_csv(path, rows[0], [rows[1][:5]])
    with pytest.raises(mu.MmflowError, match="ChooseAttr.csv line 2: wrong number of fields"):
        mu.load_gqa(csvs, images, ["ChooseAttr"])
    (images / "img1.jpg").unlink()  # a missing image is the example's problem, named when it is encoded
    (example,) = mu.load_gqa(csvs, images, ["ChooseRel"])
    with pytest.raises(mu.MmflowError, match="ChooseRel.csv line 2, question_id 201 not found: .*img1.jpg"):
        example.image()
    with pytest.raises(mu.MmflowError, match="Unknown task"):
        mu.load_examples(str(csvs), str(images), tasks=["CountObj"])
    with pytest.raises(mu.MmflowError, match="one file '\\*_QueryAttr.csv'"):
        mu.load_gqa(csvs, images, ["QueryAttr"])


def test_unreadable_image_is_reported(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    example = mu.Example("e1", "QueryAttr", "Where is it?", "left", (4, 4), image_path=str(bad))
    with pytest.raises(mu.MmflowError, match="e1 is not a readable image"):
        example.image()


def analysis_files(cache_dir) -> list[Path]:
    """The cached analysis results (not the shared greedy answers), sorted."""
    return sorted(p for p in Path(cache_dir).rglob("*.json") if not p.parent.name.startswith("answers-"))


def examples_for(run, n=4):
    """Examples on synthetic images; the first two get the model's own answer as gold (so they are kept)."""
    out = []
    for i in range(n):
        image = Image.new("RGB", (70, 50), (40 * i, 90, 200 - 30 * i))
        ex = mu.Example(
            f"ex{i}",
            "ChooseAttr",
            "Is the square red or blue?",
            "zzz",
            (70, 50),
            ["square"],
            [(5.0 * i, 4.0, 20.0, 20.0)],
            "red",
            "blue",
            _image=image,
        )
        if i < 2:
            ex.answer = mu.greedy_answer(run.model, run.processor, run.encode(ex)).strip()
        out.append(ex)
    return out


@pytest.fixture
def run(tiny_dirs, tmp_path):
    return mu.Run.load(str(tiny_dirs["llava"]), cache_dir=str(tmp_path / "results"))


def test_correctness_filter_and_resume(run, monkeypatch):
    examples = examples_for(run)
    flows = ["Image->Last", "Related patches->Question"]
    rows, status = run.knockout(examples, flows, window=3)
    assert status.correct.tolist() == [True, True, False, False]
    assert sorted(rows.example_id.unique()) == ["ex0", "ex1"]
    assert len(rows) == 2 * len(flows) * mu.num_layers(run.model)
    assert mu.accuracy_table(status).loc["ChooseAttr"].tolist() == [4, 2, 0.5]
    # resume: only the missing example is recomputed, and the results are identical
    files = analysis_files(run.cache_dir)
    assert len(files) == 4
    next(f for f in files if f.stem == examples[1].digest()).unlink()  # a kept example's result
    calls = []
    original = mmflow.runs.knockout_sweep
    monkeypatch.setattr(mmflow.runs, "knockout_sweep", lambda *a, **k: calls.append(1) or original(*a, **k))
    rows2, status2 = run.knockout(examples, flows, window=3)
    assert len(calls) == 1 and rows2.equals(rows) and status2.equals(status)


def test_flows_with_an_empty_group_are_skipped_per_example(run):
    examples = examples_for(run, 2)
    examples[1].boxes = []  # its objects are not in the image: no related patches
    rows, status = run.knockout(examples, list(mu.PATCH_FLOWS), window=3)
    assert status.skipped_flows.tolist() == [[], ["Related patches->Question"]]
    kept = rows.groupby("example_id").flow.unique().map(sorted).to_dict()
    assert kept == {"ex0": sorted(mu.PATCH_FLOWS), "ex1": ["Other patches->Question"]}


def test_shards_split_and_merge(run):
    examples = examples_for(run)
    flows = ["Question->Last"]
    part0, _ = run.knockout(examples, flows, window=3, shard=(0, 2))
    part1, _ = run.knockout(examples, flows, window=3, shard=(1, 2))
    assert set(part0.example_id) == {"ex0"} and set(part1.example_id) == {"ex1"}
    merged, status = run.knockout(examples, flows, window=3)  # everything cached: the merge step
    assert len(status) == 4 and set(merged.example_id) == {"ex0", "ex1"}
    with pytest.raises(mu.MmflowError, match="not computed yet"):
        mu.merge_cached(run.cache_dir, "no-such-key", examples)
    with pytest.raises(mu.MmflowError, match="Shard 2 of 2"):
        mu.shard_of(examples, (2, 2))


def test_lens_run_rows(run):
    examples = examples_for(run, 2)
    rows, status = run.lens(examples)
    assert status.correct.all()
    assert set(rows.token) == {
        "answer (lowercase)",
        "answer (Capitalized)",
        "false option (lowercase)",
        "false option (Capitalized)",
    }
    assert set(rows.view) == set(mu.LENS_VIEWS.values())
    assert json.loads(json.dumps(rows.prob.tolist()))  # plain floats, JSON-cacheable


def test_default_window_scales_with_depth():
    assert [mu.default_window(n) for n in (8, 16, 24, 32, 40)] == [3, 5, 7, 9, 9]


def test_cache_files_are_named_by_content_and_checked_on_read(run):
    """File names are example digests (never ids from the data); a corrupt or foreign file is named and recomputed."""
    examples = examples_for(run, 2)
    examples[0].example_id = "../../escape"  # an id from a CSV must not decide where files go
    rows, _ = run.knockout(examples, ["Image->Last"], window=3)
    files = analysis_files(run.cache_dir)
    assert sorted(f.stem for f in files) == sorted(e.digest() for e in examples)
    assert all(f.resolve().is_relative_to(Path(run.cache_dir).resolve()) for f in files)
    target = next(f for f in files if f.stem == examples[0].digest())
    other = next(f for f in files if f != target)
    for bad in ("{trunc", "{}", other.read_text()):
        target.write_text(bad)
        with pytest.warns(UserWarning, match=f"unusable cached result {target}"):
            again, _ = run.knockout(examples, ["Image->Last"], window=3)
        assert again.equals(rows)
    assert not list(Path(run.cache_dir).rglob("*.tmp"))


def test_a_larger_n_and_a_moved_checkpoint_reuse_the_cache(run, tiny_dirs, tmp_path):
    examples = examples_for(run, 3)
    run.knockout(examples[:2], ["Image->Last"], window=3)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dirs["llava"], moved)
    again = mu.Run.load(str(moved), cache_dir=run.cache_dir)
    assert again.fingerprint == run.fingerprint
    calls = []
    original = mmflow.runs.Run._check
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmflow.runs.Run, "_check", lambda self, *a: calls.append(1) or original(self, *a))
        again.knockout(examples, ["Image->Last"], window=3)
    assert len(calls) == 1  # only the new example is computed


def test_an_edited_example_is_recomputed(run):
    examples = examples_for(run, 1)
    run.knockout(examples, ["Image->Last"], window=3)
    digest = examples[0].digest()
    examples[0].question = "Is the square blue or red?"
    assert examples[0].digest() != digest
    examples[0]._image = examples[0]._image.copy()
    examples[0]._image.putpixel((0, 0), (1, 2, 3))
    assert len(analysis_files(run.cache_dir)) == 1
    run.knockout(examples, ["Image->Last"], window=3)
    assert len(analysis_files(run.cache_dir)) == 2


def test_duplicate_ids_are_rejected_with_both_named(run):
    examples = examples_for(run, 2)
    examples[1].example_id = examples[0].example_id
    with pytest.raises(
        mu.MmflowError, match=r"Duplicate example id 'ex0': examples #0 \(ChooseAttr\) and #1 \(ChooseAttr\)"
    ):
        run.knockout(examples, ["Image->Last"], window=3)
    with pytest.raises(mu.MmflowError, match="Duplicate example id"):
        run.lens(examples)


def test_bad_n_is_named():
    for n in (0, -1, "abc", 2.5):
        with pytest.raises(mu.MmflowError, match="n \\(questions per task\\) must be a positive integer"):
            mu.load_examples("shapes", n=n)
    assert len(mu.load_examples("shapes", tasks=["QueryAttr"])) == mu.DEFAULT_SHAPES_PER_TASK


def test_the_greedy_answer_is_generated_once_per_example_for_all_analyses(run, monkeypatch):
    examples = examples_for(run, 3)
    calls = []
    original = mmflow.runs.greedy_answer
    monkeypatch.setattr(mmflow.runs, "greedy_answer", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, knockout_status = run.knockout(examples, ["Image->Last"], window=3)
    _, patch_status = run.knockout(examples, list(mu.PATCH_FLOWS), window=3)
    _, lens_status = run.lens(examples)
    assert len(calls) == len(examples)  # once per example, shared through the cache
    assert knockout_status.correct.tolist() == patch_status.correct.tolist() == lens_status.correct.tolist()


def test_each_image_file_is_decoded_once_per_computed_example(tmp_path, monkeypatch):
    """The digest (content key) and the computation share one decoding; a cached example decodes it for the digest
    only; an unreadable image still reaches the computation, which names it."""
    from mmflow import cache, data

    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 6), color).save(tmp_path / name)
    examples = [
        mu.Example(str(i), "QueryAttr", "What color?", "red", (8, 6), image_path=str(tmp_path / name))
        for i, name in enumerate(["a.png", "b.png", "missing.png"])
    ]
    opened = []
    real_open = data.Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))

    calls = []

    def compute(example, digest):
        calls.append(example.example_id)
        try:
            return {"rows": [{"size": list(example.image().size)}]}
        except mu.MmflowError as err:
            return {"rows": [], "error": str(err)}

    first = cache.run_cached(examples, compute, tmp_path / "cache", "k")
    assert [r["rows"] for r in first[:2]] == [[{"size": [8, 6]}]] * 2 and "missing.png" in first[2]["error"]
    assert len(opened) == 2  # one decoding per readable image, shared by its digest and its computation
    again = cache.run_cached(examples, compute, tmp_path / "cache", "k")
    assert again == first and calls == ["0", "1", "2"]  # all from the cache
    assert len(opened) == 4  # cached: each image decoded once more, for its content digest


def test_analyses_together_equal_each_alone_and_share_each_examples_work(run, tiny_dirs, tmp_path, monkeypatch):
    """``Run.analyses`` (make sweep, notebook 6's other models in make reproduce) visits each example once for every
    analysis: it is encoded once per kind of groups and its clean run is made once for all its knockouts; every
    analysis' rows, status and result files are the ones it gives alone, byte for byte."""
    examples = examples_for(run)
    specs = [
        ("knockout", ["Image->Last", "Question->Last"]),  # keeps hidden states from the last position only
        ("knockout", ["Image->Question"]),
        ("knockout", list(mu.PATCH_FLOWS)),  # groups only the patch encoding has
        ("lens", ()),
    ]
    alone = mu.Run.load(str(tiny_dirs["llava"]), cache_dir=str(tmp_path / "alone"))
    expected = [
        alone.knockout(examples, flows, window=3) if kind == "knockout" else alone.lens(examples)
        for kind, flows in specs
    ]
    encodes, cleans = [], []
    real_encode, real_clean = mmflow.runs.encode_example, mmflow.runs.clean_run_for
    monkeypatch.setattr(mmflow.runs, "encode_example", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    monkeypatch.setattr(mmflow.runs, "clean_run_for", lambda *a, **k: cleans.append(a[3]) or real_clean(*a, **k))
    together = run.analyses(examples, specs, window=3)
    assert len(encodes) == 2 * len(examples)  # with and without patch groups
    assert len(cleans) == 2  # one per kept example, kept from its first question token for all three knockouts
    question = run.encode(examples[0]).groups["question"][0]
    assert cleans == [question, question]
    for (rows, status), (rows_alone, status_alone) in zip(together, expected):
        assert rows.equals(rows_alone) and status.equals(status_alone)
    ours, theirs = analysis_files(run.cache_dir), analysis_files(alone.cache_dir)
    assert [p.relative_to(run.cache_dir) for p in ours] == [p.relative_to(alone.cache_dir) for p in theirs]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs)) and len(ours) == 4 * len(examples)
    assert run._reuse is None  # nothing of the last example is held afterwards
    with pytest.raises(mu.MmflowError, match="'knockout' or a 'lens', got 'patching'"):
        run.analyses(examples, [("patching", ["Image->Last"])])
