"""Qwen2-VL and Qwen2.5-VL: tiny replicas saved like hub folders and loaded through the normal loader; their groups,
patch geometry, engines (against an independent oracle and each other) and logit lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_qwen import MAX_PIXELS, MIN_PIXELS, QWEN_VL_CHAT_TEMPLATE, build_tiny_qwen

import mmflow_utils as mu
from mmflow import fast, models
from mmflow.patches import base_patch_grid

KINDS = ("qwen2_vl", "qwen2_5_vl")
QUESTION = "Is the circle to the left or to the right of the square?"
FLOWS = list(mu.FLOWS) + ["image_markers->last", "image_markers->question", "true_option->last"]
SIZE, BOX = (150, 100), (90, 8, 40, 30)  # a box in the upper right of the image


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {kind: build_tiny_qwen(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def qwen(qwen_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mu.load_model(str(qwen_dirs[kind]))
        return cache[kind]

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


def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Qwen's resize rule, written out here from its description: whole 28 px cells, pixels within bounds."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def expected_labels(size, box):
    """RELATED/OTHER per 28 px cell, row-major: a cell is related if a pixel of it samples (nearest neighbour,
    pixel centres) an original pixel inside the box."""
    (width, height), (x, y, w, h) = size, box
    rh, rw = smart_resize(height, width)

    def hits(n_out, n_in, lo, hi):  # per output pixel: does its nearest source pixel lie in [lo, hi)?
        return [lo <= math.floor((i + 0.5) * n_in / n_out) < hi for i in range(n_out)]

    rows, cols = hits(rh, height, math.floor(y), math.ceil(y + h)), hits(rw, width, math.floor(x), math.ceil(x + w))
    return [
        mu.RELATED if any(rows[r * 28 : r * 28 + 28]) and any(cols[c * 28 : c * 28 + 28]) else mu.OTHER
        for r in range(rh // 28)
        for c in range(rw // 28)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_the_normal_loader(qwen, kind):
    from transformers.utils import is_torchvision_available

    model, processor = qwen(kind)
    family = models.family_of(model)
    assert family.name == {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}[kind]
    assert type(processor).__name__ == family.image_only_processor and processor.image_token == "<|image_pad|>"
    if not is_torchvision_available():  # built from its image processor (PIL), tokenizer and chat template only
        assert "video_processor" not in type(processor).get_attributes()
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.chat_template == QWEN_VL_CHAT_TEMPLATE
    import transformers

    qwen_module = transformers.models.qwen2_vl.modeling_qwen2_vl
    if kind == "qwen2_5_vl":
        qwen_module = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl
    assert models.eager_attention(model) is qwen_module.eager_attention_forward  # the backbone's own, not Llama's
    skeleton, skeleton_processor = models.load_processor(str(model.name_or_path))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)


@pytest.mark.parametrize("kind", KINDS)
def test_paper_prompt_is_the_official_template_and_groups(qwen, kind):
    model, processor = qwen(kind)
    enc = encoded_example(model, processor)
    assert enc.prompt == mu.encode(processor, picture(), QUESTION, config=model.config, inputs="processor").prompt
    assert enc.prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    grid = enc.inputs["image_grid_thw"][0].tolist()
    assert groups["image"] == list(range(groups["image"][0], groups["image"][0] + grid[1] * grid[2] // 4))
    assert {ids[p] for p in groups["image"]} == {tok.convert_tokens_to_ids("<|image_pad|>")}
    assert groups["image_markers"] == [groups["image"][0] - 1, groups["image"][-1] + 1]
    assert [tok.convert_ids_to_tokens(ids[p]) for p in groups["image_markers"]] == [
        "<|vision_start|>",
        "<|vision_end|>",
    ]
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION
    assert groups["last"] == [len(ids) - 1] and not set(groups["image_markers"]) & set(groups["question"])
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"
    assert enc.inputs["mm_token_type_ids"][0].nonzero().flatten().tolist() == groups["image"]


@pytest.mark.parametrize(
    "size,box",
    [((150, 100), BOX), ((112, 84), (0, 0, 28, 28)), ((112, 84), (29, 57, 2, 2)), ((400, 260), (10, 200, 380, 30))],
)
def test_patch_labels_against_smart_resize_arithmetic(qwen, size, box):
    model, processor = qwen("qwen2_vl")
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    assert labels == expected_labels(size, [box][0])
    assert 0 < labels.count(mu.RELATED) < len(labels)
    enc = encoded_example(model, processor, size=size, box=box)
    assert len(enc.groups["image"]) == len(labels)
    assert sorted(enc.groups["related_patches"] + enc.groups["other_patches"]) == enc.groups["image"]
    image, grid = base_patch_grid(model, processor, picture(size, box), [box])
    assert image.shape == (*smart_resize(size[1], size[0]), 3) and grid.flatten().tolist() == labels
    assert image[:, :, 0].max() > 200  # the red box survived the round trip through the patch layout


def oracle_p(model, enc, answer, sources, targets, layers):
    """Probability of ``answer`` when each layer of ``layers`` gets an explicit additive mask (causal, minus the
    cut edges), set by forward pre-hooks on the decoder layers; no mmflow attention function involved."""
    n = enc.length
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    cut = causal.clone()
    cut[torch.tensor(targets)[:, None], torch.tensor(sources)[None, :]] = False
    handles = []
    for j, layer in enumerate(models.decoder_layers(model)):
        allowed = cut if j in layers else causal
        mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

        def hook(_module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            logits = model(**enc.inputs, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(logits.double().softmax(-1)[answer])


@pytest.mark.parametrize("kind", KINDS)
def test_naive_equals_an_oracle_with_explicit_masks(qwen, kind):
    model, processor = qwen(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3  # every flow does something


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,budget", [(3, 16), (5, 4096)])
def test_fast_equals_naive(qwen, kind, window, budget):
    model, processor = qwen(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast_rows[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_fast_needs_the_models_own_m_rope_positions(qwen, monkeypatch):
    """Text after the image is not at its token index under M-RoPE: with 1-D positions the fast engine would be
    wrong (this is what the agreement above rules out)."""
    model, processor = qwen("qwen2_vl")
    enc = encoded_example(model, processor)
    rope = models.position_ids(model, enc.inputs)
    assert rope.shape == (3, enc.length) and rope[0, -1] < enc.length - 1
    grid = enc.inputs["image_grid_thw"][0].tolist()
    first = enc.groups["image"][0]
    rows, cols = grid[1] // 2, grid[2] // 2
    assert rope[1, enc.groups["image"]].tolist() == [first + r for r in range(rows) for _ in range(cols)]
    assert rope[2, enc.groups["image"]].tolist() == [first + c for _ in range(rows) for c in range(cols)]
    naive = mu.knockout_sweep(model, enc, ["Image->Question"], window=3, engine="naive")
    monkeypatch.setattr(fast, "position_ids", lambda m, inputs: torch.arange(inputs["input_ids"].shape[1])[None])
    wrong = mu.knockout_sweep(model, enc, ["Image->Question"], window=3, engine="fast")
    assert (naive.p_new - wrong.p_new).abs().max() > 1e-4


def test_fast_equals_naive_under_eager_attention(qwen_dirs):
    model, processor = mu.load_model(str(qwen_dirs["qwen2_5_vl"]))
    model.set_attn_implementation("eager")
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="fast", token_budget=16)
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens_top_is_the_output(qwen, kind):
    model, processor = qwen(kind)
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


def test_image_markers_group_is_empty_on_llava(loaded):
    """LLaVA frames no image with marker tokens: the group is empty, a sweep refuses the flow, runs skip it."""
    from mmflow.knockout import has_empty_group

    model, processor = loaded("llava")
    enc = mu.encode(processor, picture(), QUESTION, config=model.config)
    assert enc.groups["image_markers"] == [] and has_empty_group("image_markers->last", enc.groups)
    with pytest.raises(mu.MmflowError, match="empty group"):
        mu.knockout_sweep(model, enc, ["image_markers->last"], window=3)


def test_check_data_on_the_replica(qwen_dirs, tmp_path):
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(qwen_dirs["qwen2_vl"]), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(qwen_dirs, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(qwen_dirs["qwen2_vl"]),
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
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0  # the overlay on the model's 28 px cells


def test_with_torchvision_the_processor_is_autoprocessors(qwen_dirs, monkeypatch):
    """Where torchvision is installed the checkpoint's processor is built by AutoProcessor, as for every family."""
    import transformers
    import transformers.utils

    from mmflow.families import build_processor

    calls = []
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kw: calls.append(path) or "auto")
    config = transformers.AutoConfig.from_pretrained(qwen_dirs["qwen2_vl"])
    assert build_processor(str(qwen_dirs["qwen2_vl"]), config, {"local_files_only": True}) == "auto"
    assert calls == [str(qwen_dirs["qwen2_vl"])]
