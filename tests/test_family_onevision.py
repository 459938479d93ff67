"""LLaVA-OneVision: a tiny replica saved like a hub folder and loaded through the normal loader; its prompt, groups,
anyres_max_9 patch geometry (with downsampling), engines (against an independent oracle and each other), lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_family_qwen import QUESTION, oracle_p, picture
from tiny_onevision import ONEVISION_CHAT_TEMPLATE, PATCH, TILE, build_tiny_onevision

import mmflow_utils as mu
from mmflow import models

FLOWS = list(mu.FLOWS) + ["true_option->last"]
SIZE, BOX = (100, 60), (10, 10, 30, 20)


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    return build_tiny_onevision(tmp_path_factory.mktemp("onevision") / "ov")


@pytest.fixture(scope="module")
def onevision(onevision_dir):
    return mu.load_model(str(onevision_dir))


def encoded_example(model, processor, inputs="paper", size=SIZE, box=BOX):
    enc = mu.encode(
        processor, picture(size, box), QUESTION, options=("left", "right"), config=model.config, inputs=inputs
    )
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def cells(n_out, n_in, lo, hi, cell):
    """Per ``cell``-px cell of an axis resized from ``n_in`` to ``n_out`` px (nearest neighbour, pixel centres):
    does a pixel of it sample the box's [lo, hi) range?"""
    hits = [lo <= math.floor((i + 0.5) * n_in / n_out) < hi for i in range(n_out)]
    return [any(hits[c : c + cell]) for c in range(0, n_out, cell)]


def grid_labels(size, box, side):
    """RELATED/OTHER of the 14 px cells of the image resized to ``side`` x ``side`` (row-major)."""
    (width, height), (x, y, w, h) = size, box
    rows = cells(side, height, math.floor(y), math.ceil(y + h), PATCH)
    cols = cells(side, width, math.floor(x), math.ceil(x + w), PATCH)
    return torch.tensor([[mu.RELATED if r and c else mu.OTHER for c in cols] for r in rows])


def test_loads_through_the_normal_loader(onevision, onevision_dir):
    import transformers
    from transformers.utils import is_torchvision_available

    model, processor = onevision
    assert models.family_of(model).name == "llava-onevision"
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and processor.num_image_tokens == 16
    assert processor.vision_feature_select_strategy == "full" and processor.chat_template == ONEVISION_CHAT_TEMPLATE
    if not is_torchvision_available():
        assert "video_processor" not in type(processor).get_attributes()
    assert models.eager_attention(model) is transformers.models.qwen2.modeling_qwen2.eager_attention_forward
    skeleton, _ = models.load_processor(str(onevision_dir))
    assert next(skeleton.parameters()).device.type == "meta"


def test_paper_prompt_is_qwen_1_5_and_groups(onevision):
    model, processor = onevision
    enc = encoded_example(model, processor)
    assert enc.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        f"{QUESTION}\nAnswer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    )
    processor_prompt = mu.encode(processor, picture(), QUESTION, config=model.config).prompt
    assert processor_prompt.startswith("<|im_start|>user <image>\n")  # llava-hf's template: not the training prompt
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    assert groups["image"] == [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<image>")]
    assert groups["image"] == list(range(groups["image"][0], groups["image"][-1] + 1)) and groups["image_markers"] == []
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION and groups["last"] == [len(ids) - 1]
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"


def test_patch_labels_base_tile_and_unpadded_grid(onevision):
    """A 100 x 60 image: the base tile (4 x 4 cells of the image squeezed to 56 px), then the 112 x 112 grid: the
    image resized to 112 x 68 (width-bound), pasted 22 px down, its 8 x 8 features unpadded to rows 2..5, each row
    followed by a newline."""
    model, processor = onevision
    labels = mu.image_token_labels(model, processor, SIZE, [BOX])
    assert labels[:16].tolist() == grid_labels(SIZE, BOX, TILE).flatten().tolist()
    (x, y, w, h), (width, height) = BOX, SIZE
    row_hit = [22 <= r < 90 and y <= math.floor((r - 22 + 0.5) * height / 68) < y + h for r in range(112)]
    col_hit = [x <= math.floor((c + 0.5) * width / 112) < x + w for c in range(112)]
    related = [
        [any(row_hit[14 * r : 14 * r + 14]) and any(col_hit[14 * c : 14 * c + 14]) for c in range(8)]
        for r in range(2, 6)
    ]
    rows = labels[16:].view(4, 9)  # 8 features + a newline per row
    assert (rows[:, -1] == mu.NEITHER).all()
    assert rows[:, :-1].tolist() == [[mu.RELATED if hit else mu.OTHER for hit in row] for row in related]
    assert 0 < int((labels == mu.RELATED).sum()) < int((labels == mu.OTHER).sum())
    assert len(encoded_example(model, processor).groups["image"]) == len(labels)


def test_patch_labels_downsampled_like_the_features(onevision):
    """A 220 x 220 image takes the 224 x 224 grid (16 x 16 features > 9 tiles x 1.1): the model downsamples its
    features bilinearly to 12 x 12; a downsampled token is related if a related cell contributes to it."""
    model, processor = onevision
    size, box = (220, 220), (150, 20, 50, 40)
    labels = mu.image_token_labels(model, processor, size, [box])
    full = grid_labels(size, box, 224)
    down = torch.nn.functional.interpolate(full[None, None], [12, 12], mode="bilinear")[0, 0]
    expected = torch.where(down > 0, mu.RELATED, mu.OTHER)
    expected = torch.cat([expected, torch.full((12, 1), mu.NEITHER)], 1).flatten()
    assert labels[:16].tolist() == grid_labels(size, box, TILE).flatten().tolist()
    assert labels[16:].tolist() == expected.tolist() and len(labels) == 16 + 12 * 13
    enc = encoded_example(model, processor, size=size, box=box)
    assert len(enc.groups["image"]) == len(labels) and enc.groups["related_patches"]


def test_naive_equals_an_oracle_with_explicit_masks(onevision):
    model, processor = onevision
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3


@pytest.mark.parametrize("size", [SIZE, (220, 220)])
@pytest.mark.parametrize("window,budget", [(3, 16), (5, 4096)])
def test_fast_equals_naive(onevision, size, window, budget):
    model, processor = onevision
    enc = encoded_example(model, processor, size=size, box=(10, 10, 30, 20))
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_logit_lens_top_is_the_output(onevision):
    model, processor = onevision
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].softmax(-1)
    tokens = {"top": int(probs.argmax()), "other": 7}
    lens = mu.logit_lens(model, enc, tokens, views=tuple(mu.LENS_VIEWS))
    n = mu.num_layers(model)
    for label in (mu.WITH_NORM, mu.PAPER_VIEW):
        top = lens[(lens.view == label) & (lens.layer == n - 1) & (lens.token == "top")].prob.item()
        assert abs(top - probs[tokens["top"]].item()) < 1e-6


def test_patch_groups_notebook_end_to_end(onevision_dir, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(onevision_dir),
        smoke=True,
        keep="all",
        out_dir=str(out),
        cache_dir=str(tmp_path / "results"),
    )
    curves = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}.csv")
    assert set(curves.flow) == set(mu.PATCH_FLOWS) and set(curves.layer) == set(range(6))
    assert curves["mean"].notna().all()
    accounting = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}_examples.csv")
    assert (accounting.kept == accounting.examples).all() and accounting.kept.sum() == 12
    assert json.loads((out / "manifest.json").read_text())[mu.FIG_PATCH_GROUPS]["inputs"] == "paper"
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0


def test_check_data_on_the_replica(onevision_dir, tmp_path):
    """make check-data's path: the geometry from a weightless skeleton (packing included) agrees with the processor."""
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(onevision_dir), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()
