"""InternVL (HF-native): tiny replicas with Qwen2, Llama and Qwen3 backbones, saved like hub folders and loaded through
the normal loader; their groups, tile + thumbnail patch geometry, engines (against an independent oracle and each
other) and logit lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from test_family_qwen import oracle_p
from tiny_internvl import (
    BACKBONES,
    INTERNVL_CHAT_TEMPLATE,
    MAX_PATCHES,
    SYSTEM,
    TILE,
    TOKENS_PER_TILE,
    build_tiny_internvl,
)

import mmflow_utils as mu
from mmflow import models
from mmflow.patches import base_patch_grid

QUESTION = "Is the circle to the left or to the right of the square?"
FLOWS = list(mu.FLOWS) + [
    "image_markers->last",
    "related_patches@thumbnail->last",
    "related_patches@tiles->last",
    "true_option->last",
]
SIZE, BOX = (150, 100), (90, 8, 40, 30)  # 2 x 2 tiles + thumbnail; a box in the upper right


@pytest.fixture(scope="module")
def internvl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    return {backbone: build_tiny_internvl(root / backbone, backbone) for backbone in BACKBONES}


@pytest.fixture(scope="module")
def internvl(internvl_dirs):
    cache = {}

    def get(backbone):
        if backbone not in cache:
            cache[backbone] = mu.load_model(str(internvl_dirs[backbone]))
        return cache[backbone]

    return get


def picture(size=SIZE, box=BOX):
    image = Image.new("RGB", size, (30, 30, 30))
    x, y, w, h = box
    image.paste((220, 40, 40), (x, y, x + w, y + h))
    return image


def encoded_example(model, processor, inputs="paper", size=SIZE, box=BOX):
    enc = mu.encode(
        processor, picture(size, box), QUESTION, options=("left", "right"), config=model.config, inputs=inputs
    )
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def tile_grid(width, height, max_tiles=MAX_PATCHES):
    """(cols, rows) of InternVL's dynamic tiling, written out here from its description: among the grids of 1 to
    ``max_tiles`` tiles (fewest tiles first), the one whose aspect ratio is closest to the image's; on a tie the
    larger grid wins while the image's area exceeds half the grid's."""
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(width / height - c / r)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * TILE * TILE * c * r):
            best, best_diff = (c, r), min(diff, best_diff)
    return best


def expected_labels(size, box):
    """(labels, views) per image token: the tiles row-major then the thumbnail (only with more than one tile), each
    tile's tokens row-major over 28 px cells; a cell is related if a pixel of it samples (nearest neighbour, pixel
    centres) an original pixel inside the box."""
    (width, height), (x, y, w, h) = size, box
    cols, rows = tile_grid(width, height)

    def hits(n_out, n_in, lo, hi):  # per output pixel: does its nearest source pixel lie in [lo, hi)?
        return [lo <= math.floor((i + 0.5) * n_in / n_out) < hi for i in range(n_out)]

    def tile(ys, xs):
        cells = TILE // 28
        return [
            mu.RELATED if any(ys[r * 28 : r * 28 + 28]) and any(xs[c * 28 : c * 28 + 28]) else mu.OTHER
            for r in range(cells)
            for c in range(cells)
        ]

    ys = hits(TILE * rows, height, math.floor(y), math.ceil(y + h))
    xs = hits(TILE * cols, width, math.floor(x), math.ceil(x + w))
    labels = [lab for t in range(rows * cols) for lab in tile(ys[t // cols * TILE :], xs[t % cols * TILE :])]
    views = ["tiles"] * len(labels)
    if rows * cols > 1:
        ys, xs = hits(TILE, height, math.floor(y), math.ceil(y + h)), hits(TILE, width, math.floor(x), math.ceil(x + w))
        thumb = tile(ys, xs)
        labels, views = labels + thumb, views + ["thumbnail"] * len(thumb)
    return labels, views


@pytest.mark.parametrize("backbone", BACKBONES)
def test_loads_through_the_normal_loader(internvl, backbone):
    import importlib

    from transformers.utils import is_torchvision_available

    model, processor = internvl(backbone)
    family = models.family_of(model)
    assert family.name == "internvl" and model.config.get_text_config().model_type == backbone
    assert type(processor).__name__ == "InternVLProcessor" and processor.image_token == "<IMG_CONTEXT>"
    if not is_torchvision_available():  # built from its image processor (PIL), tokenizer and chat template only
        assert "video_processor" not in type(processor).get_attributes()
        assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert processor.chat_template == INTERNVL_CHAT_TEMPLATE and processor.image_seq_length == TOKENS_PER_TILE
    backbone_module = importlib.import_module(f"transformers.models.{backbone}.modeling_{backbone}")
    assert models.eager_attention(model) is backbone_module.eager_attention_forward  # the backbone's own
    skeleton, skeleton_processor = models.load_processor(str(model.name_or_path))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)


@pytest.mark.parametrize("inputs", ["paper", "processor"])
def test_prompts_and_groups(internvl, inputs):
    model, processor = internvl("qwen2")
    enc = encoded_example(model, processor, inputs)
    user = f"<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}\n{mu.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    system = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if inputs == "paper" else ""  # the HF template sends none
    assert enc.prompt == system + user
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    n_tiles = len(enc.inputs["pixel_values"])
    assert n_tiles == 5  # 2 x 2 crops and the thumbnail
    assert groups["image"] == list(range(groups["image"][0], groups["image"][0] + n_tiles * TOKENS_PER_TILE))
    assert {ids[p] for p in groups["image"]} == {tok.convert_tokens_to_ids("<IMG_CONTEXT>")}
    assert groups["image_markers"] == [groups["image"][0] - 1, groups["image"][-1] + 1]
    assert [tok.convert_ids_to_tokens(ids[p]) for p in groups["image_markers"]] == ["<img>", "</img>"]
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION  # offsets past the inserted markers
    assert groups["question"][0] == groups["image_markers"][1] + 2  # after "</img>" and "\n"
    assert groups["last"] == [len(ids) - 1] and not set(groups["image_markers"]) & set(groups["question"])
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"
    bare = mu.encode(processor, picture(), QUESTION, inputs="processor")  # no config: no family, same offsets
    assert tok.decode(bare.inputs["input_ids"][0][bare.groups["question"]]) == QUESTION


@pytest.mark.parametrize(
    "size,box",
    [
        (SIZE, BOX),
        ((84, 84), (30, 30, 10, 10)),  # one tile, no thumbnail
        ((60, 200), (5, 150, 20, 40)),  # 1 x 3 tiles (tall)
        ((300, 80), (100, 10, 40, 60)),  # 4 x 1 tiles (wide)
        ((150, 100), (0, 0, 150, 100)),  # everything related
    ],
)
def test_patch_labels_against_tiling_arithmetic(internvl, size, box):
    model, processor = internvl("qwen2")
    labels, views = expected_labels(size, box)
    assert mu.image_token_labels(model, processor, size, [box]).tolist() == labels
    assert labels.count(mu.RELATED) > 0
    enc = encoded_example(model, processor, size=size, box=box)
    groups, image = enc.groups, enc.groups["image"]
    assert len(image) == len(labels) == len(enc.inputs["pixel_values"]) * TOKENS_PER_TILE
    for name, label in (("related_patches", mu.RELATED), ("other_patches", mu.OTHER)):
        for view in ("tiles", "thumbnail"):
            expected = [p for p, lab, v in zip(image, labels, views) if lab == label and v == view]
            assert groups[f"{name}@{view}"] == expected
        assert groups[name] == sorted(groups[f"{name}@tiles"] + groups[f"{name}@thumbnail"])  # the union
    assert sorted(groups["related_patches"] + groups["other_patches"]) == image
    assert (groups["related_patches@thumbnail"] == []) == (views.count("thumbnail") == 0)
    shown, grid = base_patch_grid(model, processor, picture(size, box), [box])
    assert shown.shape == (TILE, TILE, 3) and grid.flatten().tolist() == labels[-TOKENS_PER_TILE:]
    assert shown[:, :, 0].max() > 200  # the red box is in the whole-image view


def test_patch_groups_refuse_a_kept_cls_token(internvl, monkeypatch):
    """With vision_feature_select_strategy 'full' the tile's CLS would be a token: no 2 x 2 patch grid to label."""
    model, processor = internvl("qwen2")
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(mu.MmflowError, match="vision_feature_select_strategy='default'"):
        mu.image_token_labels(model, processor, SIZE, [BOX])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_naive_equals_an_oracle_with_explicit_masks(internvl, backbone):
    model, processor = internvl(backbone)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-4  # every flow does something


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("window,budget", [(3, 16), (5, 4096)])
def test_fast_equals_naive(internvl, backbone, window, budget):
    model, processor = internvl(backbone)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast_rows[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_fast_equals_naive_under_eager_attention(internvl_dirs):
    model, processor = mu.load_model(str(internvl_dirs["llama"]))
    model.set_attn_implementation("eager")
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="fast", token_budget=16)
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_logit_lens_top_is_the_output(internvl, backbone):
    model, processor = internvl(backbone)
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        out = model(**enc.inputs, output_hidden_states=True)
    probs = out.logits[0, -1].softmax(-1)
    tokens = {"top": int(probs.argmax()), "other": 7}
    lens = mu.logit_lens(model, enc, tokens, views=tuple(mu.LENS_VIEWS))
    n = mu.num_layers(model)
    view = {label: part.pivot(index="layer", columns="token", values="prob") for label, part in lens.groupby("view")}
    for label in (mu.WITH_NORM, mu.PAPER_VIEW):
        assert abs(view[label].loc[n - 1, "top"] - probs[tokens["top"]].item()) < 1e-6
    head, norm = model.get_output_embeddings(), mu.text_model(model).norm
    with torch.inference_mode():
        h = out.hidden_states[2][:, -1]  # the raw output of layer 1
        assert abs(view[mu.RAW].loc[1, "other"] - head(h)[0].softmax(-1)[7].item()) < 1e-6
        assert abs(view[mu.WITH_NORM].loc[1, "other"] - head(norm(h))[0].softmax(-1)[7].item()) < 1e-6


def test_check_data_on_the_replica(internvl_dirs, tmp_path):
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(internvl_dirs["qwen2"]), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(internvl_dirs, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(internvl_dirs["qwen2"]),
        smoke=True,
        keep="all",
        out_dir=str(out),
        cache_dir=str(tmp_path / "results"),
    )
    curves = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}.csv")
    assert set(curves.flow) == set(mu.PATCH_FLOWS) and set(curves.layer) == set(range(6))
    assert curves["mean"].notna().all() and curves["mean"].abs().max() > 0
    accounting = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}_examples.csv")
    assert (accounting.kept == accounting.examples).all() and accounting.kept.sum() == 12  # smoke: 2 per task
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[mu.FIG_PATCH_GROUPS]["inputs"] == "paper" and manifest[mu.FIG_PATCH_GROUPS]["n_layers"] == 6
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0  # the overlay on the thumbnail's 28 px cells
