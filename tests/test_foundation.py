"""Loading, prompts, token groups and patch groups on tiny random LLaVA / LLaVA-NeXT checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny
import torch
from PIL import Image

import mmflow_utils as mu

QUESTION = "Is the circle to the left or to the right of the square?"


def test_load_picks_class_by_structure(loaded):
    for name, cls in [("llava", "LlavaForConditionalGeneration"), ("llava_next", "LlavaNextForConditionalGeneration")]:
        model, processor = loaded(name)
        assert type(model).__name__ == cls
        assert not model.training
        assert mu.num_layers(model) == 6
        assert type(processor.image_processor).__name__.endswith("Pil")


def test_missing_model_error_names_it(tmp_path):
    with pytest.raises(mu.MmflowError, match="llava-hf/llava-1.5-7b-hf.*huggingface-cli download"):
        mu.load_model("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(mu.MmflowError, match="Model folder .*no-such-folder.* not found"):
        mu.load_model(str(tmp_path / "no-such-folder"))


def test_unsupported_model_class(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny._text_config(100, 2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(mu.MmflowError, match="Unsupported model class: config LlamaConfig"):
        mu.load_model(str(tmp_path / "llama"))


@pytest.mark.parametrize("name", ["llava", "llava_sp", "llava_next", "llava_next_sp"])
def test_token_groups(loaded, name):
    model, processor = loaded(name)
    image = Image.new("RGB", (90, 60), (120, 30, 30))
    enc = mu.encode(processor, image, QUESTION, options=("left", "right"), objects=["circle", "square"])
    ids = enc.inputs["input_ids"][0]
    decode = lambda group: processor.tokenizer.decode(ids[enc.groups[group]]).strip()  # noqa: E731
    assert decode("question") == QUESTION
    q = enc.groups["question"]
    assert q == list(range(q[0], q[-1] + 1)), "question tokens are contiguous"
    assert decode("true_option") == "left" and decode("false_option") == "right"
    assert decode("object:circle") == "circle" and decode("object:square") == "square"
    assert enc.groups["last"] == [enc.length - 1]
    assert processor.tokenizer.decode(ids[-1:]).strip() == ":"
    image_pos = enc.groups["image"]
    assert image_pos == list(range(image_pos[0], image_pos[-1] + 1)) and image_pos[-1] < q[0]
    # the processor's expansion matches the model's features: a forward runs (it checks the counts)
    with torch.no_grad():
        model(**enc.inputs)


def test_sentencepiece_tokenizer_is_real(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llava_sp"])
    assert len(tok) > 32000
    assert tok.convert_ids_to_tokens(tok("the square", add_special_tokens=False)["input_ids"]) == ["▁the", "▁square"]


def test_chat_template_prompt_and_question_not_found(tiny_dirs):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dirs["llava"])
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    prompt = mu.build_prompt(processor, "Is it red?")
    assert prompt == "USER: <image>\nIs it red?\n" + mu.INSTRUCTION + " ASSISTANT:"
    processor.chat_template = "USER: <image>\nDescribe the image. ASSISTANT:"
    with pytest.raises(mu.MmflowError, match="Question 'Is it red\\?' not found in the prompt"):
        mu.encode(processor, Image.new("RGB", (20, 20)), "Is it red?")


def test_encode_rejects_non_images_and_records_missing_options(loaded):
    _, processor = loaded("llava")
    with pytest.raises(mu.MmflowError, match="Expected a PIL image, got ndarray"):
        mu.encode(processor, np.zeros((20, 20, 3)), "Is it red?")
    enc = mu.encode(processor, Image.new("RGB", (20, 20)), "Is it red or blue?", options=("green", "blue"))
    assert "true_option" not in enc.groups and enc.located["true_option"].startswith("not found")


@pytest.mark.parametrize(
    "question,options,objects,expected",
    [
        ("Is the red car red or blue?", ("red", "blue"), ["car"], {"true_option": "red", "false_option": "blue"}),
        (
            "Is the table to the left of the chair, a table or a chair?",
            ("table", "chair"),
            [],
            {"true_option": "table", "false_option": "chair"},
        ),
        (
            "Is it a telephone or a laptop?",
            ("phone", "laptop"),
            [],
            {"true_option": "telephone", "false_option": "laptop"},
        ),
        (
            "Is the carpet to the left or to the right of the car?",
            ("right", "left"),
            ["car"],
            {"true_option": "right", "false_option": "left", "object:car": "car"},
        ),
        ("Is the skateboarder to the left of the skateboard?", (), ["skateboard"], {"object:skateboard": "skateboard"}),
        ("Are there both men and women?", (), ["man", "woman"], {"object:man": "men", "object:woman": "women"}),
    ],
)
def test_option_and_object_groups_hold_the_right_words(loaded, question, options, objects, expected):
    """The tokens of each group decode to the intended word: the "X or Y" slot, the exact object word first."""
    _, processor = loaded("llava_sp")
    enc = mu.encode(processor, Image.new("RGB", (20, 20)), question, options=options, objects=objects)
    ids = enc.inputs["input_ids"][0]
    for group, word in expected.items():
        text = processor.tokenizer.decode(ids[enc.groups[group]]).strip()
        assert text == word, (group, text)
    if options:  # one option right before the question's last "or", the other after it
        question = enc.groups["question"]
        or_at = max(i for i in question if processor.tokenizer.decode(ids[i : i + 1]).strip() == "or")
        first, second = sorted([enc.groups["true_option"][0], enc.groups["false_option"][0]])
        assert first == or_at - 1 and second > or_at


# ---------------------------------------------------------------------------------------------------------
# Patch groups against independently computed box geometry
# ---------------------------------------------------------------------------------------------------------


def overlap_sets(boxes, transform, grid_h, grid_w, cell):
    """(strict, loose) sets of cells (row-major indices) overlapping the transformed boxes by >= 1 px / > -1 px."""
    strict, loose = set(), set()
    for x, y, w, h in boxes:
        (x0, y0), (x1, y1) = transform(x, y), transform(x + w, y + h)
        for r in range(grid_h):
            for c in range(grid_w):
                ox = min(x1, (c + 1) * cell) - max(x0, c * cell)
                oy = min(y1, (r + 1) * cell) - max(y0, r * cell)
                if ox >= 1 and oy >= 1:
                    strict.add(r * grid_w + c)
                if ox > -1 and oy > -1:
                    loose.add(r * grid_w + c)
    return strict, loose


def crop_transform(W, H, side):
    """CLIP: shortest edge -> side (long edge int-truncated), then centre crop side x side."""
    if W <= H:
        nw, nh = side, int(side * H / W)
    else:
        nw, nh = int(side * W / H), side
    left, top = (nw - side) // 2, (nh - side) // 2
    return lambda x, y: (x * nw / W - left, y * nh / H - top)


def pad_transform(W, H, side):
    """LLaVA-1.5: pad to a centred square of the long edge, then resize to side x side."""
    m = max(W, H)
    ox, oy = (m - W) // 2, (m - H) // 2
    return lambda x, y: ((x + ox) * side / m, (y + oy) * side / m)


def expected_llava(W, H, boxes, transform):
    g = tiny.IMAGE // tiny.PATCH
    return overlap_sets(boxes, transform(W, H, tiny.IMAGE), g, g, tiny.PATCH)


def expected_anyres(W, H, boxes):
    """LLaVA-NeXT: base image (squashed) + tiles of the best grid resolution, unpadded, one newline per row.

    Returns (strict, loose, n_tokens) as indices into the image-token run.
    """
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in tiny.GRID_PINPOINTS:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        if eff > best_eff or (eff == best_eff and w * h - eff < best_waste):
            best, best_eff, best_waste = (h, w), eff, w * h - eff
    th, tw = best
    s = min(tw / W, th / H)
    nw, nh = (tw, min(math.ceil(H * s), th)) if tw / W < th / H else (min(math.ceil(W * s), tw), th)
    px, py = (tw - nw) // 2, (th - nh) // 2
    g = tiny.IMAGE // tiny.PATCH
    base_s, base_l = overlap_sets(boxes, lambda x, y: (x * tiny.IMAGE / W, y * tiny.IMAGE / H), g, g, tiny.PATCH)
    rows, cols = th // tiny.PATCH, tw // tiny.PATCH  # full HD feature grid (tiles side by side)
    hd_s, hd_l = overlap_sets(boxes, lambda x, y: (x * nw / W + px, y * nh / H + py), rows, cols, tiny.PATCH)
    # unpadding of the feature grid
    r0, r1, c0, c1 = 0, rows, 0, cols
    if cols / rows < W / H:
        pad = (rows - int(round(H * cols / W, 7))) // 2
        r0, r1 = pad, rows - pad
    else:
        pad = (cols - int(round(W * rows / H, 7))) // 2
        c0, c1 = pad, cols - pad
    strict, loose = set(base_s), set(base_l)
    width = c1 - c0 + 1  # + newline
    for src, dst in ((hd_s, strict), (hd_l, loose)):
        for i in src:
            r, c = divmod(i, cols)
            if r0 <= r < r1 and c0 <= c < c1:
                dst.add(g * g + (r - r0) * width + (c - c0))
    return strict, loose, g * g + (r1 - r0) * width


SIZES = [(90, 60), (60, 90), (56, 56), (200, 70), (45, 130), (123, 77)]


def box_cases(W, H):
    """Boxes at fixed places (some cropped away by centre crops), a central one, and a sub-patch sliver."""
    fixed = [[(10, 10, 20, 15)], [(0, 0, 12, 12), (30, 20, 25, 35)], [(5.5, 17.2, 3.1, 2.2)]]
    fixed = [[b for b in boxes if b[0] < W and b[1] < H] for boxes in fixed]
    return fixed + [[(0.45 * W, 0.4 * H, 0.1 * W + 0.5, 0.15 * H + 0.7)]]


def _check(labels, image_pos_count, strict, loose):
    related = {i for i, lab in enumerate(labels) if lab == mu.RELATED}
    assert len(labels) == image_pos_count
    assert strict <= related <= loose, (sorted(strict), sorted(related), sorted(loose))
    return bool(strict) and len(loose) < image_pos_count  # the case discriminates related from other


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "name,transform,inputs",
    [
        ("llava", crop_transform, "processor"),
        ("llava_pad", pad_transform, "processor"),
        ("llava", pad_transform, "paper"),
    ],
)
def test_llava_patch_groups_match_geometry(loaded, size, name, transform, inputs):
    """Crop processors crop; the pad processor and the paper's inputs (on a crop processor) pad to a square."""
    model, processor = loaded(name)
    W, H = size
    discriminating = 0
    for boxes in box_cases(W, H):
        strict, loose = expected_llava(W, H, boxes, transform)
        labels = mu.image_token_labels(model, processor, size, boxes, inputs).tolist()
        discriminating += _check(labels, (tiny.IMAGE // tiny.PATCH) ** 2, strict, loose)
    assert discriminating >= 1


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["llava_next", "llava_next_sp"])
def test_anyres_patch_groups_match_geometry(loaded, size, name):
    model, processor = loaded(name)
    W, H = size
    image = Image.new("RGB", size, (10, 200, 10))
    enc = mu.encode(processor, image, "Is the square red or blue?")
    discriminating = 0
    for boxes in box_cases(W, H):
        strict, loose, n_tokens = expected_anyres(W, H, boxes)
        labels = mu.image_token_labels(model, processor, size, boxes).tolist()
        assert n_tokens == len(enc.groups["image"])
        discriminating += _check(labels, n_tokens, strict, loose)
        groups = mu.patch_groups(model, processor, enc.groups["image"], size, boxes)
        newlines = [p for p, lab in zip(enc.groups["image"], labels) if lab == mu.NEITHER]
        assert len(newlines) > 0 and not set(newlines) & set(groups["related_patches"] + groups["other_patches"])
        assert sorted(groups["related_patches"] + groups["other_patches"] + newlines) == enc.groups["image"]
    assert discriminating == len(box_cases(W, H))


def test_pad_to_square_padding_is_other(loaded):
    model, processor = loaded("llava_pad")
    # a box covering the whole (wide) image: every patch of the top/bottom padding band stays "other"
    labels = mu.image_token_labels(model, processor, (112, 56), [(0, 0, 112, 56)]).view(4, 4)
    assert labels[0].eq(mu.OTHER).all() and labels[3].eq(mu.OTHER).all()
    assert labels[1:3].eq(mu.RELATED).all()
