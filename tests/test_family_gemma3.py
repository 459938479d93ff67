"""Gemma 3: a tiny replica saved like a hub folder and loaded through the normal loader; its groups, patch geometry
(squash + average pooling), the knockout against an oracle that builds each layer's mask itself (sliding or global,
image block bidirectional), the fast engine's refusal, and the logit lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_gemma3 import GEMMA3_CHAT_TEMPLATE, IMAGE, LAYER_TYPES, TOKENS, WINDOW, build_tiny_gemma3

import mmflow_utils as mu
from mmflow import models
from mmflow.patches import base_patch_grid

QUESTION = "Is the circle to the left or to the right of the square?"
FLOWS = list(mu.FLOWS) + [
    "related_patches->other_patches",
    "image_markers->last",
    "image_markers->question",
    "true_option->last",
]
SIZE, BOX = (150, 100), (90, 8, 40, 30)  # a box in the upper right of the image
#: pan-and-scan options of the pan-and-scan replica (crops from 32 px, so the small test images get some)
PAS = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 32,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
CELL = IMAGE // math.isqrt(TOKENS)  # pixels of the squashed image per image token (56 in the released models)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "gemma3")


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return mu.load_model(str(gemma_dir))


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


def expected_labels(size, box):
    """RELATED/OTHER per image token, row-major: the image is squashed to IMAGE x IMAGE and each token averages the
    patches of a CELL x CELL square; a token is related if a pixel of its cell samples (nearest neighbour, pixel
    centres) an original pixel inside the box."""
    (width, height), (x, y, w, h) = size, box

    def hits(n_in, lo, hi):  # per squashed pixel: does its nearest source pixel lie in [lo, hi)?
        return [lo <= math.floor((i + 0.5) * n_in / IMAGE) < hi for i in range(IMAGE)]

    rows, cols = hits(height, math.floor(y), math.ceil(y + h)), hits(width, math.floor(x), math.ceil(x + w))
    side = IMAGE // CELL
    return [
        mu.RELATED if any(rows[r * CELL : (r + 1) * CELL]) and any(cols[c * CELL : (c + 1) * CELL]) else mu.OTHER
        for r in range(side)
        for c in range(side)
    ]


def test_loads_through_the_normal_loader(gemma):
    import transformers

    model, processor = gemma
    assert models.family_of(model).name == "gemma3" and type(processor).__name__ == "Gemma3Processor"
    assert type(processor.image_processor).__name__ == "Gemma3ImageProcessorPil"  # no torchvision needed
    assert processor.chat_template == GEMMA3_CHAT_TEMPLATE
    assert models.eager_attention(model) is transformers.models.gemma3.modeling_gemma3.eager_attention_forward
    assert models.token_pool(model) == 2 and models.num_layers(model) == len(LAYER_TYPES)
    skeleton, skeleton_processor = models.load_processor(str(model.name_or_path))
    assert next(skeleton.parameters()).device.type == "meta" and models.token_pool(skeleton) == 2


def test_paper_prompt_is_the_official_template_and_groups(gemma):
    model, processor = gemma
    enc = encoded_example(model, processor)
    assert enc.prompt == mu.encode(processor, picture(), QUESTION, config=model.config, inputs="processor").prompt
    assert enc.prompt.startswith("<bos><start_of_turn>user\n<start_of_image>" + QUESTION)
    assert enc.prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, no second one
    assert groups["image"] == list(range(groups["image"][0], groups["image"][0] + TOKENS))
    assert {ids[p] for p in groups["image"]} == {model.config.image_token_id}
    assert [tok.convert_ids_to_tokens(ids[p]) for p in groups["image_markers"]] == [
        "<start_of_image>",
        "<end_of_image>",
    ]
    assert groups["image_markers"] == [groups["image"][0] - 1, groups["image"][-1] + 1]
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION
    assert groups["last"] == [len(ids) - 1] and not set(groups["image_markers"]) & set(groups["question"])
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"
    assert enc.inputs["token_type_ids"][0].nonzero().flatten().tolist() == groups["image"]  # drives the image block


def test_encode_without_config_is_refused_not_mislabelled(gemma):
    """Without the config the processor's image_token_id is the <start_of_image> marker, not the soft token: the
    image and question groups would be wrong, so encode refuses, naming config."""
    model, processor = gemma
    with pytest.raises(mu.MmflowError, match=r"1 image tokens .*config=model.config"):
        mu.encode(processor, picture(), QUESTION)


@pytest.mark.parametrize(
    "size,box",
    [(SIZE, BOX), ((112, 112), (0, 0, 28, 28)), ((112, 84), (29, 57, 2, 2)), ((400, 260), (10, 200, 380, 30))],
)
def test_patch_labels_against_squash_and_pooling_arithmetic(gemma, size, box):
    model, processor = gemma
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    assert labels == expected_labels(size, box) and 0 < labels.count(mu.RELATED) < len(labels)
    enc = encoded_example(model, processor, size=size, box=box)
    assert sorted(enc.groups["related_patches"] + enc.groups["other_patches"]) == enc.groups["image"]
    image, grid = base_patch_grid(model, processor, picture(size, box), [box])
    assert image.shape == (IMAGE, IMAGE, 3) and grid.flatten().tolist() == labels
    assert image[:, :, 0].max() > 200  # the red box survived the squash


def crop_boxes(width, height, min_crop=PAS["pan_and_scan_min_crop_size"], most=PAS["pan_and_scan_max_num_crops"]):
    """Pan-and-scan crops (x0, y0, x1, y1), written out here from its description: when the long side is at least
    1.2 times the short one, about one crop per aspect-ratio unit along the long side (2 to ``most``, each at least
    ``min_crop`` px), cut from the original image."""
    long, short = max(width, height), min(width, height)
    if long / short < PAS["pan_and_scan_min_ratio_to_activate"]:
        return []
    n = max(2, min(most, math.floor(long / short + 0.5), math.floor(long / min_crop)))
    side = math.ceil(long / n)
    if min(side, short) < min_crop:
        return []
    if width >= height:
        return [(i * side, 0, min(width, (i + 1) * side), height) for i in range(n)]
    return [(0, i * side, width, min(height, (i + 1) * side)) for i in range(n)]


@pytest.fixture(scope="module")
def pan_and_scan(tmp_path_factory):
    return mu.load_model(str(build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "pas", pan_and_scan=PAS)))


@pytest.mark.parametrize("size,box", [(SIZE, BOX), ((100, 260), (10, 100, 30, 30)), ((112, 112), (0, 0, 28, 28))])
def test_pan_and_scan_views_union_and_per_view_groups(pan_and_scan, size, box):
    """With pan-and-scan on, the model sees the original and its crops, each framed and bidirectional on its own:
    the image and patch groups are the union over views, and each view is its own pair of patch groups."""
    model, processor = pan_and_scan
    crops = crop_boxes(*size)
    expected = [expected_labels(size, box)]
    for x0, y0, x1, y1 in crops:
        expected.append(expected_labels((x1 - x0, y1 - y0), (box[0] - x0, box[1] - y0, box[2], box[3])))
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    assert labels == [label for view in expected for label in view]
    enc = encoded_example(model, processor, size=size, box=box)
    ids, groups = enc.inputs["input_ids"][0].tolist(), enc.groups
    assert len(groups["image"]) == TOKENS * (1 + len(crops)) and len(groups["image_markers"]) == 2 * (1 + len(crops))
    assert enc.inputs["token_type_ids"][0].nonzero().flatten().tolist() == groups["image"]
    assert processor.tokenizer.decode([ids[p] for p in groups["question"]]) == QUESTION
    names = ["original"] + [f"crop{k}" for k in range(1, len(crops) + 1)]
    for v, (name, view) in enumerate(zip(names, expected)):
        positions = groups["image"][v * TOKENS : (v + 1) * TOKENS]
        related = [p for p, label in zip(positions, view) if label == mu.RELATED]
        if crops:
            assert groups[f"related_patches@{name}"] == related
            assert sorted(groups[f"related_patches@{name}"] + groups[f"other_patches@{name}"]) == positions
        assert set(related) <= set(groups["related_patches"])
    assert crops or not [g for g in groups if "@" in g]  # one view: no per-view groups
    assert sorted(groups["related_patches"] + groups["other_patches"]) == groups["image"]
    image, grid = base_patch_grid(model, processor, picture(size, box), [box])
    assert image.shape == (IMAGE, IMAGE, 3) and grid.flatten().tolist() == expected[0]  # the original view


def test_pan_and_scan_naive_equals_the_per_view_oracle(pan_and_scan):
    model, processor = pan_and_scan
    enc = encoded_example(model, processor)
    assert "related_patches@crop2" in enc.groups and not enc.groups["related_patches@crop1"]
    plain = processor(images=picture(), text=processor.image_token, return_tensors="pt")
    assert len(plain["pixel_values"]) == 1  # the processor call alone drops the checkpoint's pan-and-scan (5.23)
    flows = ["Image->Question", "Related patches->Question", "related_patches@crop2->last", "other_patches->image"]
    naive = mu.knockout_sweep(model, enc, flows[:3], window=3, layers=[1, 4], engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].double().softmax(-1)
    assert abs(oracle_p(model, enc, answer, [], [], []) - probs[answer].item()) < 1e-6  # blocks per view
    assert abs(oracle_p(model, enc, answer, [], [], [], views_apart=False) - probs[answer].item()) > 1e-5


def layer_masks(model, enc, sources=(), targets=(), bidirectional=True, views_apart=True):
    """Each layer's boolean mask (True = may attend), built here from the config: causal, OR the image block
    (every image token sees every token of its view: a run of consecutive image tokens), AND, in sliding layers,
    the window; minus the cut edges. ``views_apart=False``: one block over all image tokens (wrong with crops)."""
    n = enc.length
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    image = torch.zeros(n, dtype=torch.bool)
    image[enc.groups["image"]] = True
    starts = image & ~torch.cat([torch.tensor([False]), image[:-1]])
    view = torch.cumsum(starts.int(), 0) if views_apart else torch.ones(n, dtype=torch.int)
    block = image[:, None] & image[None, :] & (view[:, None] == view[None, :])
    full = (kv <= q) | (block if bidirectional else False)
    sliding = full & (q - kv < model.config.get_text_config().sliding_window)
    cut = torch.zeros(n, n, dtype=torch.bool)
    if len(targets):
        cut[torch.tensor(targets)[:, None], torch.tensor(sources)[None, :]] = True
    types = model.config.get_text_config().layer_types
    return [(sliding if kind == "sliding_attention" else full) & ~cut for kind in types]


def oracle_p(model, enc, answer, sources, targets, layers, bidirectional=True, views_apart=True):
    """Probability of ``answer`` when every decoder layer gets the additive mask :func:`layer_masks` builds (cut
    edges only in ``layers``), set by forward pre-hooks; no mmflow attention function involved."""
    clean = layer_masks(model, enc, bidirectional=bidirectional, views_apart=views_apart)
    cut = layer_masks(model, enc, sources, targets, bidirectional, views_apart)
    handles = []
    for j, layer in enumerate(models.decoder_layers(model)):
        allowed = cut[j] if j in layers else clean[j]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

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


def test_oracle_masks_are_the_models_own(gemma):
    """The oracle's clean masks reproduce the model's output; a causal image (what the model would do without
    token_type_ids) does not, so the comparisons below see the bidirectional block."""
    model, processor = gemma
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].double().softmax(-1)
    answer = int(probs.argmax())
    assert abs(oracle_p(model, enc, answer, [], [], []) - probs[answer].item()) < 1e-6
    assert abs(oracle_p(model, enc, answer, [], [], [], bidirectional=False) - probs[answer].item()) > 1e-4
    assert len(enc.groups["image"]) > WINDOW and {"sliding_attention", "full_attention"} == set(LAYER_TYPES)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_naive_equals_an_oracle_that_builds_each_layers_mask(gemma_dir, attn):
    model, processor = mu.load_model(str(gemma_dir))
    model.set_attn_implementation(attn)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3  # every flow does something
    assert model.config.get_text_config()._attn_implementation == attn


def test_knockout_keeps_the_image_block_bidirectional(gemma):
    """Cutting Question->Last leaves the image's bidirectional part intact (against the oracle with, and without,
    the block); a window of sliding layers only cannot cut Image->Last, which lies outside their window."""
    model, processor = gemma
    enc = encoded_example(model, processor)
    sources, targets = enc.groups["question"], enc.groups["last"]
    sliding_only = [j for j, kind in enumerate(LAYER_TYPES[:2]) if kind == "sliding_attention"]
    rows = mu.knockout_sweep(model, enc, ["Question->Last", "Image->Last"], window=3, layers=[0, 1], engine="naive")
    answer = int(rows.answer_token.iloc[0])
    row = rows[(rows.flow == "Question->Last") & (rows.layer == 1)].iloc[0]
    layers = range(row.window_start, row.window_end + 1)
    assert abs(row.p_new - oracle_p(model, enc, answer, sources, targets, layers)) <= 1e-6
    causal_image = oracle_p(model, enc, answer, sources, targets, layers, bidirectional=False)
    assert abs(row.p_new - causal_image) > 1e-4
    window_0 = rows[(rows.flow == "Image->Last") & (rows.layer == 0)].iloc[0]
    assert list(range(window_0.window_start, window_0.window_end + 1)) == sliding_only
    assert enc.length - 1 - enc.groups["image"][-1] >= WINDOW and window_0.p_new == window_0.p_base


def test_a_flow_that_empties_a_sliding_window_is_refused(gemma):
    """image->image cuts every key of the later image tokens in the sliding layers (their window holds only image
    tokens): the rows would be undefined, so the sweep refuses, naming the position."""
    model, processor = gemma
    enc = encoded_example(model, processor)
    first_empty = enc.groups["image"][0] + WINDOW - 1  # its window: WINDOW image tokens, all cut
    with pytest.raises(mu.MmflowError, match=f"every key of position {first_empty} in the sliding-window"):
        mu.knockout_sweep(model, enc, ["image->image"], window=3, engine="naive")
    assert mu.flow_positions("image->image", enc.groups, enc.length)  # well defined without the window


def test_fast_engine_is_refused_naming_naive(gemma):
    model, processor = gemma
    enc = encoded_example(model, processor)
    with pytest.raises(mu.MmflowError, match='engine="naive"'):
        mu.knockout_sweep(model, enc, ["Image->Last"], window=3, engine="fast")


@pytest.mark.parametrize("softcap", [None, 1.0])
def test_logit_lens_top_is_the_output(tmp_path, softcap):
    """The top layer equals the model's output in the final-norm and paper views; raw and paper agree with the
    model's hidden_states, whose first entry is the embedding scaled by sqrt(hidden). Gemma3ForConditionalGeneration
    applies no final-logit softcap (transformers 5.23: only Gemma3ForCausalLM does), so neither does the lens, even
    with final_logit_softcapping set."""
    model, processor = mu.load_model(str(build_tiny_gemma3(tmp_path / "g", softcap=softcap)))
    assert model.config.get_text_config().final_logit_softcapping == softcap
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
    head, norm, text = model.get_output_embeddings(), mu.text_model(model).norm, mu.text_model(model)
    assert head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()  # tied
    with torch.inference_mode():
        if softcap is not None:
            assert out.logits[0, -1].abs().max() > softcap  # uncapped
        embedded = text.embed_tokens.weight[enc.inputs["input_ids"][0, -1]] * math.sqrt(
            model.config.text_config.hidden_size
        )
        assert abs(view[mu.PAPER_VIEW].loc[-1, "other"] - head(embedded).softmax(-1)[7].item()) < 1e-6
        h = out.hidden_states[2][:, -1]  # the raw output of layer 1
        assert abs(view[mu.RAW].loc[1, "other"] - head(h)[0].softmax(-1)[7].item()) < 1e-6
        assert abs(view[mu.WITH_NORM].loc[1, "other"] - head(norm(h))[0].softmax(-1)[7].item()) < 1e-6
    for layer in range(n - 1):
        assert abs(view[mu.RAW].loc[layer, "other"] - view[mu.PAPER_VIEW].loc[layer, "other"]) < 1e-7


@pytest.mark.parametrize("views", ["one", "pan_and_scan"])
def test_check_data_on_the_replica(gemma_dir, pan_and_scan, tmp_path, views):
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    folder = gemma_dir if views == "one" else pan_and_scan[0].name_or_path
    rows = check_rows(str(folder), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(gemma_dir, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(gemma_dir),
        smoke=True,
        keep="all",
        engine="naive",
        out_dir=str(out),
        cache_dir=str(tmp_path / "results"),
    )
    curves = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}.csv")
    assert set(curves.flow) == set(mu.PATCH_FLOWS) and set(curves.layer) == set(range(len(LAYER_TYPES)))
    assert curves["mean"].notna().all() and curves["mean"].abs().max() > 0
    accounting = pd.read_csv(out / f"{mu.FIG_PATCH_GROUPS}_examples.csv")
    assert (accounting.kept == accounting.examples).all() and accounting.kept.sum() == 12  # smoke: 2 per task
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[mu.FIG_PATCH_GROUPS]["inputs"] == "paper" and manifest[mu.FIG_PATCH_GROUPS]["n_layers"] == 6
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0
