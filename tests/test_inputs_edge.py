"""Every data input checked at its edge: boxes against the image, image files of every mode, links out of the image
folder, and question_ids used twice; ``make check-data`` meets each of them as a run would."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gqa_fixture import build_gqa
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_trust import TASK_FILE, query_row, write

import mmflow_utils as mu
from mmflow.cache import check_unique_ids
from mmflow.check_data import check_rows, main
from mmflow.images import box_issues, conversion_notes, to_rgb
from mmflow.models import load_processor
from mmflow.patches import box_mask


@pytest.fixture
def gqa(tmp_path):
    """A CSV folder and an image folder holding one 64x48 RGB JPEG, ``img1.jpg``."""
    csvs, images = tmp_path / "csv", tmp_path / "images"
    csvs.mkdir(), images.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(images / "img1.jpg")
    return csvs, images


def load(csvs, images):
    return mu.load_gqa(csvs, images, ["QueryAttr"])


def marked(size, box) -> int:
    """Red pixels of a one-box mask."""
    return int((np.asarray(box_mask(size, [box]))[:, :, 0] == 255).sum())


# ------------------------------------------------------------------------------------------------------------ boxes


def test_negative_box_is_refused_naming_file_line_id_and_column(gqa):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row(), query_row("7", box=("-30", "-30", "10", "12"))])
    with pytest.raises(mu.MmflowError) as err:
        load(csvs, images)
    message = str(err.value)
    assert f"{TASK_FILE} line 3, question_id 7: column 'central object x'" in message
    assert "must start inside the image (x, y >= 0)" in message
    write(csvs / TASK_FILE, [query_row("8", box=("3", "-0.5", "10", "12"))])
    with pytest.raises(mu.MmflowError, match="question_id 8: column 'central object y'"):
        load(csvs, images)


def test_box_mask_marks_nothing_for_a_box_off_the_image():
    assert marked((64, 48), (-30, -30, 10, 12)) == 0  # was 1,320 pixels: a negative slice end counted from the far edge
    assert marked((64, 48), (70, 50, 5, 5)) == 0
    assert marked((64, 48), (60, 40, 10, 10)) == 4 * 8  # the part past the far edges is clipped


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(*[st.floats(-60, 60, allow_nan=False)] * 2, *[st.floats(0.1, 60, allow_nan=False)] * 2),
)
def test_box_mask_marks_exactly_the_pixels_the_box_touches_inside_the_image(size, box):
    """Against a pixel-by-pixel definition: pixel (c, r) is marked iff its cell [c, c+1) x [r, r+1) meets the box
    after rounding the box outwards to whole pixels, and it lies in the image."""
    x, y, w, h = box
    cols = [c for c in range(size[0]) if np.floor(x) <= c < np.ceil(x + w)]
    rows = [r for r in range(size[1]) if np.floor(y) <= r < np.ceil(y + h)]
    expected = np.zeros((size[1], size[0]), bool)
    expected[np.ix_(rows, cols)] = True
    assert ((np.asarray(box_mask(size, [box]))[:, :, 0] == 255) == expected).all()


def test_box_rule_errors_and_notes():
    errors, notes = box_issues((500, 375), [(503, 91, 163, 72), (0, 96, 667, 185), (0, 0, 501, 376)], ["a", "b"])
    assert errors == ["box of 'a' (503, 91, 163, 72) lies outside the 500x375 image"]
    assert notes == ["box of 'b' (0, 96, 667, 185) reaches 167 px past the 500x375 image: the part outside is clipped"]
    errors, _ = box_issues((64, 48), [(-30, -30, 10, 12)])  # an Example built in Python, not from a CSV
    assert errors == ["box 1 (-30, -30, 10, 12) must start inside the image (x, y >= 0)"]


def test_a_box_outside_the_image_refuses_the_patch_groups_only(gqa, tiny_dirs):
    csvs, images = gqa
    write(csvs / TASK_FILE, [query_row(box=("70", "4", "10", "12"))])
    (example,) = load(csvs, images)
    skeleton, processor = load_processor(str(tiny_dirs["llava"]))
    mu.encode_example(processor, example, model=skeleton, patches=False)  # usable without patch groups
    with pytest.raises(mu.MmflowError, match=f"{TASK_FILE} line 2, question_id 1: box of 'central object'.*outside"):
        mu.encode_example(processor, example, model=skeleton, patches=True)


def test_check_data_flags_boxes(gqa, tiny_dirs):
    csvs, images = gqa
    boxes = [("-30", "-30", "10", "12"), ("70", "4", "10", "12"), ("40", "4", "34", "12"), ("3", "4", "62", "12")]
    write(csvs / TASK_FILE, [query_row(str(i), box=box) for i, box in enumerate(boxes)])
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images), tasks=["QueryAttr"]).set_index("question_id")
    negative = rows[rows.location == f"{TASK_FILE} line 2"].iloc[0]
    assert not negative.usable and "column 'central object x'" in negative.reason
    assert not rows.loc["1"].usable and "lies outside the 64x48 image" in rows.loc["1"].reason
    assert rows.loc["2"].usable and "reaches 10 px past the 64x48 image" in rows.loc["2"].notes
    assert rows.loc["3"].usable and rows.loc["3"].notes == "" and rows.loc["3"].reason == ""  # 1 px: clipped quietly


# ----------------------------------------------------------------------------------------------------------- images


def grey16() -> np.ndarray:
    """A 64x48 16-bit ramp over the whole range."""
    return np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)


def expected_eight(values: np.ndarray) -> np.ndarray:
    """16 bits to 8 by rounding v * 255 / 65535 (float arithmetic, independent of the integer formula)."""
    return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def test_a_16_bit_png_is_scaled_not_clipped(gqa):
    csvs, images = gqa
    Image.fromarray(grey16()).save(images / "img1.jpg", format="PNG")  # the content decides, not the name
    write(csvs / TASK_FILE, [query_row()])
    (example,) = load(csvs, images)
    assert Image.open(images / "img1.jpg").mode == "I;16"
    pixels = np.asarray(example.image())
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 64, 3)
    assert (pixels == expected_eight(grey16())[..., None]).all()
    assert (pixels == 255).mean() < 0.01  # was 99.6% white


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes_are_scaled_alike(mode):
    values = grey16()
    image = Image.fromarray(values.astype(np.int32)).convert("I") if mode == "I" else Image.fromarray(values)
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (64, 48), values.astype(">u2").tobytes())
    assert image.mode == mode
    assert (np.asarray(to_rgb(image)) == expected_eight(values)[..., None]).all()
    assert conversion_notes(image) == [
        f"{mode} ({'32-bit integer, read as 16-bit' if mode == 'I' else '16-bit'}) grey: scaled to 8 bits"
    ]


def test_a_32_bit_image_out_of_16_bit_range_and_float_images_are_refused_by_name(gqa):
    with pytest.raises(mu.MmflowError, match="mode 'I' with values 0..70000 outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)), "x")
    keyed = Image.fromarray(grey16())
    keyed.info["transparency"] = 0  # a 16-bit colour key: no alpha rule for it, so refused rather than dropped
    with pytest.raises(mu.MmflowError, match="mode 'I;16' with transparency is not supported"):
        to_rgb(keyed, "x")
    csvs, images = gqa
    Image.fromarray(np.ones((48, 64), np.float32)).save(images / "img1.jpg", format="TIFF")
    write(csvs / TASK_FILE, [query_row()])
    (example,) = load(csvs, images)
    with pytest.raises(mu.MmflowError, match=r"question_id 1 \(.*img1.jpg\): image mode 'F' is not supported"):
        example.image()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing onto white in floats (transformers' convert_to_rgb rule, for numpy arrays)."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return alpha * rgba[..., :3] + (1 - alpha) * 255


def test_alpha_is_composited_onto_white_as_the_llava_processors_do():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    for mode in ("RGBA", "LA", "PA"):
        image = Image.fromarray(rgba).convert(mode)
        reference = composite_on_white(np.asarray(image.convert("RGBA")))
        assert np.abs(np.asarray(to_rgb(image)).astype(float) - reference).max() <= 1, mode
        see_through = (np.asarray(image.convert("RGBA"))[..., 3] < 255).sum()
        assert conversion_notes(image) == [f"has alpha: {see_through} of 3072 pixels not opaque, composited onto white"]
    palette = Image.new("P", (4, 4), 3)
    palette.info["transparency"] = 3  # a palette entry marked transparent
    assert np.asarray(to_rgb(palette)).min() == 255
    assert conversion_notes(Image.new("RGBA", (2, 2), (1, 2, 3, 255))) == []  # opaque: nothing changes, no note


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "CMYK", "YCbCr"])
def test_plain_modes_read_as_the_paper_reads_them(gqa, mode):
    """No alpha, 8 bits: the pixels (and so the digests of existing results) are PIL's convert("RGB")."""
    csvs, images = gqa
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).convert(mode)
    image.save(images / "img1.jpg", format="TIFF")
    write(csvs / TASK_FILE, [query_row()])
    (example,) = load(csvs, images)
    with Image.open(images / "img1.jpg") as stored:
        assert stored.mode == mode
        assert example.image().tobytes() == stored.convert("RGB").tobytes()
    assert example.decoded()[1] == []


def test_exif_orientation_is_not_applied_and_is_noted(gqa, tiny_dirs):
    csvs, images = gqa
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    stored = Image.new("RGB", (64, 48), (200, 10, 10))
    stored.save(images / "img1.jpg", exif=exif)
    write(csvs / TASK_FILE, [query_row()])
    (example,) = load(csvs, images)
    assert example.image().size == (64, 48)  # stored pixels: image_w/image_h and boxes stay in stored pixels
    assert example.decoded()[1] == ["EXIF orientation 6 not applied: pixels read as stored"]
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images), tasks=["QueryAttr"])
    assert rows.usable.all() and rows.notes.tolist() == ["EXIF orientation 6 not applied: pixels read as stored"]


def test_check_data_lists_what_the_conversion_changes(tmp_path, tiny_dirs, capsys):
    csvs, images, total = build_gqa(tmp_path)
    rgba = np.zeros((100, 200, 4), np.uint8)
    rgba[:50, :, 3] = 255  # the lower half transparent
    Image.fromarray(rgba).save(images / "queryattr0.jpg", format="PNG")
    ramp = np.linspace(0, 65535, 400 * 100).round().astype(np.uint16).reshape(100, 400)
    Image.fromarray(ramp).save(images / "queryattr1.jpg", format="PNG")
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images)).set_index("location")
    query = next(csvs.glob("*_QueryAttr.csv")).name
    assert rows.usable.all() and (rows.notes != "").sum() == 2
    assert rows.loc[f"{query} line 2", "notes"] == "has alpha: 10000 of 20000 pixels not opaque, composited onto white"
    assert rows.loc[f"{query} line 4", "notes"] == "I;16 (16-bit) grey: scaled to 8 bits"
    assert main(["--model", str(tiny_dirs["llava"]), "--data", str(csvs), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert f"{query} line 4 (question_id 01007): note: I;16 (16-bit) grey: scaled to 8 bits" in out
    assert f"check-data: {total} rows, {total} usable, 0 skipped" in out


def test_encode_converts_a_pil_image_by_the_same_rule(tiny_dirs):
    processor = load_processor(str(tiny_dirs["llava"]))[1]
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))  # red, but fully transparent: white
    encoded = mu.encode(processor, rgba, "Where is the jar?")
    white = mu.encode(processor, Image.new("RGB", (64, 48), (255, 255, 255)), "Where is the jar?")
    assert encoded.inputs["pixel_values"].equal(white.inputs["pixel_values"])


def test_a_processor_without_its_record_of_the_image_expansion_is_refused_by_name(tiny_dirs):
    """The text after the image is located through the processor's text_replacement_offsets; a processor that
    returns none is refused, naming its class, rather than guessed at."""
    processor = load_processor(str(tiny_dirs["llava"]))[1]
    assert mu.encode(processor, Image.new("RGB", (64, 48)), "Where is the jar?").groups["question"]

    class SilentProcessor(type(processor)):
        def __call__(self, *args, **kwargs):
            batch = super().__call__(*args, **kwargs)
            batch.pop("text_replacement_offsets", None)
            return batch

    processor.__class__ = SilentProcessor
    with pytest.raises(mu.MmflowError, match="SilentProcessor returned no text_replacement_offsets"):
        mu.encode(processor, Image.new("RGB", (64, 48)), "Where is the jar?")


# ----------------------------------------------------------------------------------------------------- image folder


def test_a_link_out_of_the_image_folder_is_refused(gqa, tmp_path):
    csvs, images = gqa
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (64, 48)).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", images / "img2.jpg")
    os.symlink(images / "img1.jpg", images / "img3.jpg")  # a link within the folder is fine
    write(csvs / TASK_FILE, [query_row(), query_row("2", img="img2"), query_row("3", img="img3")])
    one, two, three = load(csvs, images)
    assert one.image().size == three.image().size == (64, 48)
    with pytest.raises(mu.MmflowError) as err:
        two.image()
    assert "question_id 2" in str(err.value) and "img2.jpg leads to" in str(err.value)
    assert "secret.jpg, outside the image folder" in str(err.value)
    linked = tmp_path / "linked_images"
    os.symlink(images, linked)  # the image folder itself may be a link
    assert load(csvs, linked)[0].image().size == (64, 48)


def test_check_data_flags_a_link_out_of_the_image_folder(gqa, tmp_path, tiny_dirs):
    csvs, images = gqa
    Image.new("RGB", (64, 48)).save(tmp_path / "secret.jpg")
    os.symlink(tmp_path / "secret.jpg", images / "img2.jpg")
    write(csvs / TASK_FILE, [query_row(), query_row("2", img="img2")])
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images), tasks=["QueryAttr"])
    assert rows.usable.tolist() == [True, False] and "outside the image folder" in rows.reason[1]


# -------------------------------------------------------------------------------------------------------------- ids


def test_check_data_flags_ids_used_twice_as_the_run_refuses_them(tmp_path, tiny_dirs):
    csvs, images, total = build_gqa(tmp_path)
    query = next(csvs.glob("*_QueryAttr.csv"))
    query.write_text(query.read_text().replace("\n01006,", "\n01000,"))  # the id of ChooseCat's first row
    rel = next(csvs.glob("*_ChooseRel.csv"))
    rel.write_text(rel.read_text().replace("\n01009,", "\n01008,"))  # twice in one file
    with pytest.raises(mu.MmflowError, match="Duplicate example id '01008'"):
        check_unique_ids(mu.load_gqa(csvs, images))  # what a run does
    with pytest.raises(mu.MmflowError, match="Duplicate example id '01000'"):
        check_unique_ids(mu.load_gqa(csvs, images, ["ChooseCat", "QueryAttr"]))
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images)).set_index("location")
    flagged = rows[~rows.usable]
    assert sorted(flagged.question_id) == ["01000", "01000", "01008", "01008"] and len(rows) == total
    cat, query_line = f"{csvs.glob('*_ChooseCat.csv').__next__().name} line 2", f"{query.name} line 2"
    assert (
        flagged.loc[cat, "reason"] == f"question_id '01000' is also used at {query_line}: a run refuses duplicate ids"
    )
    assert flagged.loc[query_line, "reason"].startswith(f"question_id '01000' is also used at {cat}")
    assert f"is also used at {rel.name} line 4" in flagged.loc[f"{rel.name} line 2", "reason"]
