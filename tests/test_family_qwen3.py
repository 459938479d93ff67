"""Qwen3-VL and Qwen3-VL-MoE: tiny replicas saved like hub folders and loaded through the normal loader; their
prompt, groups, 32 px patch geometry, interleaved M-RoPE, DeepStack (naive exact against an independent oracle; fast
equal to naive where it reuses clean states, refused where DeepStack makes them wrong) and logit lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_family_qwen import QUESTION, oracle_p, picture, smart_resize
from tiny_qwen3 import DEEPSTACK, KINDS, MAX_PIXELS, MIN_PIXELS, PATCH, QWEN3_VL_CHAT_TEMPLATE, build_tiny_qwen3

import mmflow_utils as mu
from mmflow import fast, models
from mmflow.patches import base_patch_grid

CELL = 32  # 16 px patches, 2x2 merge
FLOWS = list(mu.FLOWS) + ["image_markers->last", "image_markers->question", "true_option->last"]
SIZE, BOX = (150, 100), (90, 8, 40, 30)


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {kind: build_tiny_qwen3(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def qwen3(qwen3_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mu.load_model(str(qwen3_dirs[kind]))
        return cache[kind]

    return get


def encoded_example(model, processor, inputs="paper", size=SIZE, box=BOX):
    enc = mu.encode(
        processor, picture(size, box), QUESTION, options=("left", "right"), config=model.config, inputs=inputs
    )
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def expected_labels(size, box):
    """RELATED/OTHER per 32 px cell, row-major, written out from the geometry: smart_resize to whole 32 px cells
    within the pixel bounds, nearest-neighbour sampling at pixel centres, a cell related if it samples the box."""
    (width, height), (x, y, w, h) = size, box
    rh, rw = smart_resize(height, width, factor=CELL, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

    def hits(n_out, n_in, lo, hi):
        return [lo <= math.floor((i + 0.5) * n_in / n_out) < hi for i in range(n_out)]

    rows, cols = hits(rh, height, math.floor(y), math.ceil(y + h)), hits(rw, width, math.floor(x), math.ceil(x + w))
    return [
        mu.RELATED if any(rows[r * CELL : (r + 1) * CELL]) and any(cols[c * CELL : (c + 1) * CELL]) else mu.OTHER
        for r in range(rh // CELL)
        for c in range(rw // CELL)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_the_normal_loader(qwen3, kind):
    import transformers
    from transformers.utils import is_torchvision_available

    model, processor = qwen3(kind)
    family = models.family_of(model)
    assert family.name == {"qwen3_vl": "qwen3-vl", "qwen3_vl_moe": "qwen3-vl-moe"}[kind]
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.image_token == "<|image_pad|>"
    if not is_torchvision_available():  # built from its image processor (PIL), tokenizer and chat template only
        assert "video_processor" not in type(processor).get_attributes()
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.image_processor.patch_size == PATCH and processor.image_processor.merge_size == 2
    assert processor.chat_template == QWEN3_VL_CHAT_TEMPLATE
    module = {"qwen3_vl": transformers.models.qwen3_vl, "qwen3_vl_moe": transformers.models.qwen3_vl_moe}[kind]
    own = getattr(module, f"modeling_{kind}").eager_attention_forward
    assert models.eager_attention(model) is own  # the backbone's own, not Llama's
    assert models.deepstack_layers(model) == len(DEEPSTACK) and models.num_layers(model) == 6
    skeleton, skeleton_processor = models.load_processor(str(model.name_or_path))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)


@pytest.mark.parametrize("kind", KINDS)
def test_paper_prompt_has_no_system_turn_and_groups(qwen3, kind):
    model, processor = qwen3(kind)
    enc = encoded_example(model, processor)
    assert enc.prompt == mu.encode(processor, picture(), QUESTION, config=model.config, inputs="processor").prompt
    assert enc.prompt == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{QUESTION}\nAnswer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    _, grid_h, grid_w = enc.inputs["image_grid_thw"][0].tolist()
    h, w = smart_resize(SIZE[1], SIZE[0], factor=CELL, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert (grid_h, grid_w) == (h // PATCH, w // PATCH)  # 16 px patches
    assert groups["image"] == list(range(groups["image"][0], groups["image"][0] + (h // CELL) * (w // CELL)))
    assert {ids[p] for p in groups["image"]} == {tok.convert_tokens_to_ids("<|image_pad|>")}
    assert groups["image_markers"] == [groups["image"][0] - 1, groups["image"][-1] + 1]
    assert [tok.convert_ids_to_tokens(ids[p]) for p in groups["image_markers"]] == [
        "<|vision_start|>",
        "<|vision_end|>",
    ]
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION
    assert groups["last"] == [len(ids) - 1] and not set(groups["image_markers"]) & set(groups["question"])
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert enc.inputs["mm_token_type_ids"][0].nonzero().flatten().tolist() == groups["image"]


@pytest.mark.parametrize(
    "size,box",
    [(SIZE, BOX), ((128, 96), (0, 0, 32, 32)), ((128, 96), (31, 63, 2, 2)), ((400, 260), (10, 200, 380, 30))],
)
def test_patch_labels_against_32px_cell_arithmetic(qwen3, size, box):
    model, processor = qwen3("qwen3_vl")
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    assert labels == expected_labels(size, box)
    assert 0 < labels.count(mu.RELATED) < len(labels)
    enc = encoded_example(model, processor, size=size, box=box)
    assert len(enc.groups["image"]) == len(labels)
    assert sorted(enc.groups["related_patches"] + enc.groups["other_patches"]) == enc.groups["image"]
    image, grid = base_patch_grid(model, processor, picture(size, box), [box])
    h, w = smart_resize(size[1], size[0], factor=CELL, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert image.shape == (h, w, 3) and grid.shape == (h // CELL, w // CELL) and grid.flatten().tolist() == labels
    assert image[:, :, 0].max() > 200


def test_m_rope_positions_and_the_interleaved_layout(qwen3):
    """The model's own positions: image tokens share (t, h, w) = (p, p + row, p + col), text after the image
    advances by the grid's side; the rotary embedding interleaves the sections (frequency j reads h where
    j % 3 == 1 and j < 3 * section_h, w where j % 3 == 2 and j < 3 * section_w, t elsewhere)."""
    model, processor = qwen3("qwen3_vl")
    enc = encoded_example(model, processor)
    rope = models.position_ids(model, enc.inputs)
    first, image = enc.groups["image"][0], enc.groups["image"]
    _, grid_h, grid_w = (x // 2 for x in enc.inputs["image_grid_thw"][0].tolist())
    assert rope[0, image].tolist() == [first] * len(image)
    assert rope[1, image].tolist() == [first + r for r in range(grid_h) for _ in range(grid_w)]
    assert rope[2, image].tolist() == [first + c for _ in range(grid_h) for c in range(grid_w)]
    assert rope[0, image[-1] + 1] == first + max(grid_h, grid_w) and rope[0, -1] < enc.length - 1
    position = image[-1]  # t, h and w all differ here
    cos, _ = models.rotary_embedding(model)(torch.zeros(1, 1, 64), rope[:, None, position : position + 1])
    inv_freq = models.rotary_embedding(model).inv_freq
    section = model.config.text_config.rope_parameters["mrope_section"]
    axis = [1 if j % 3 == 1 and j < 3 * section[1] else 2 if j % 3 == 2 and j < 3 * section[2] else 0
            for j in range(len(inv_freq))]  # fmt: skip
    expected = torch.stack([(rope[a, position] * inv_freq[j]).cos() for j, a in enumerate(axis)])
    assert torch.allclose(cos[0, 0, : len(inv_freq)], expected, atol=1e-6) and {1, 2} <= set(axis)


def test_deepstack_is_live_in_the_replica(qwen3):
    """DeepStack adds vision features to the first layers' outputs at the image positions after transformers
    records them: layer 1's real input differs from the recorded hidden state there, and only there."""
    model, processor = qwen3("qwen3_vl")
    enc = encoded_example(model, processor)
    inputs = []
    handle = models.decoder_layers(model)[1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        with torch.inference_mode():
            recorded = model(**enc.inputs, output_hidden_states=True).hidden_states[1]
    finally:
        handle.remove()
    differs = (inputs[0][0] - recorded[0]).abs().amax(-1) > 1e-6
    assert differs.nonzero().flatten().tolist() == enc.groups["image"]


@pytest.mark.parametrize("kind", KINDS)
def test_naive_equals_an_oracle_with_explicit_masks(qwen3, kind):
    """Exact with DeepStack, also for a flow whose targets are image tokens (the marker before the image)."""
    model, processor = qwen3(kind)
    enc = encoded_example(model, processor)
    flows = FLOWS + ["image_markers->image"]
    naive = mu.knockout_sweep(model, enc, flows, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,budget", [(3, 16), (5, 4096)])
def test_fast_equals_naive_for_targets_after_the_image(qwen3, kind, window, budget):
    model, processor = qwen3(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast_rows[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_fast_refuses_image_targets_which_it_would_get_wrong(qwen3, monkeypatch):
    """A flow whose targets include image tokens would reuse hidden states recorded before the DeepStack addition
    (and skip the additions to its copies): refused, naming engine='naive'. Without the refusal it is wrong."""
    model, processor = qwen3("qwen3_vl")
    enc = encoded_example(model, processor)
    with pytest.raises(mu.MmflowError, match=r"DeepStack.*engine='naive'"):
        mu.knockout_sweep(model, enc, ["image_markers->image"], window=3, engine="fast")
    with pytest.raises(mu.MmflowError, match=r"engine='naive'"):  # one such flow among good ones is enough
        mu.knockout_sweep(model, enc, ["Image->Last", "image_markers->image"], window=3, engine="fast")
    naive = mu.knockout_sweep(model, enc, ["image_markers->image"], window=3, engine="naive")
    monkeypatch.setattr(fast, "check_reusable_from", lambda *args: None)
    wrong = mu.knockout_sweep(model, enc, ["image_markers->image"], window=3, engine="fast")
    assert (naive.p_new - wrong.p_new).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens_top_is_the_output(qwen3, kind):
    model, processor = qwen3(kind)
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
        h = out.hidden_states[2][:, -1]  # the raw output of layer 1 at the last position (no DeepStack there)
        assert abs(view[mu.RAW].loc[1, "other"] - head(h)[0].softmax(-1)[7].item()) < 1e-6
        assert abs(view[mu.WITH_NORM].loc[1, "other"] - head(norm(h))[0].softmax(-1)[7].item()) < 1e-6


def test_check_data_on_the_replica(qwen3_dirs, tmp_path):
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(qwen3_dirs["qwen3_vl"]), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(qwen3_dirs, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(qwen3_dirs["qwen3_vl"]),
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
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0  # the overlay on the model's 32 px cells
