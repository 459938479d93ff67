"""What only Gemma 3 and Idefics3 / SmolVLM have (what every family shares: tests/test_families.py): Gemma 3's
bidirectional image block, sliding window, pan-and-scan views (``@original`` / ``@cropK``), refusal without the config
and uncapped logits; Idefics3's tiles and global image (``@tiles`` / ``@global``), marker sequence, BOS rule and
processor requirements. The one oracle is :func:`mmflow.families_check.oracle_p`."""

from __future__ import annotations

import math

import pytest
import torch
from test_families import lens_matches_output

import mmflow_utils as mu
from mmflow import families_check as fc
from mmflow import models
from mmflow.patches import base_patch_grid
from mmflow.replicas import geometry, replica
from mmflow.replicas.gemma3 import WINDOW, build_tiny_gemma3
from mmflow.replicas.idefics3 import TILE, TOKENS_PER_TILE

SIZE, BOX = replica("gemma3").size, replica("gemma3").box
TOKENS = 16  # Gemma 3 replica: image tokens per view
#: pan-and-scan options of the pan-and-scan replica (crops from 32 px, so the small test images get some)
PAS = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 32,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


def encoded(model, processor, size=SIZE, box=BOX):
    return fc.encode_picture(model, processor, size, box)


def test_gemma3_loads_with_its_pooling_and_refuses_encoding_without_config(replica_model):
    """Average pooling 2 x 2 (also on the weightless skeleton); without the config the processor's image_token_id is
    the <start_of_image> marker, not the soft token: encode refuses, naming config."""
    model, processor = replica_model("gemma3")
    assert models.token_pool(model) == 2 and type(processor.image_processor).__name__ == "Gemma3ImageProcessorPil"
    assert models.token_pool(models.load_processor(str(model.name_or_path))[0]) == 2
    with pytest.raises(mu.MmflowError, match=r"1 image tokens .*config=model.config"):
        mu.encode(processor, fc.picture(SIZE, BOX), fc.QUESTION)


def test_gemma3_oracle_masks_are_the_models_own(replica_model):
    """The oracle's clean masks reproduce the model's output; a causal image (what the model would do without
    token_type_ids) does not, so the knockout comparisons see the bidirectional block."""
    model, processor = replica_model("gemma3")
    enc = encoded(model, processor)
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].double().softmax(-1)
    answer = int(probs.argmax())
    assert abs(fc.oracle_p(model, enc, answer, [], [], [], True) - probs[answer].item()) < 1e-6
    assert abs(fc.oracle_p(model, enc, answer, [], [], [], False) - probs[answer].item()) > 1e-4
    types = set(model.config.get_text_config().layer_types)
    assert len(enc.groups["image"]) > WINDOW and types == {"sliding_attention", "full_attention"}


def test_gemma3_knockout_keeps_the_image_block_bidirectional(replica_model):
    """Cutting Question->Last leaves the image's bidirectional part intact (the oracle with, not without, the block);
    a window of sliding layers only cannot cut Image->Last, which lies outside their window."""
    model, processor = replica_model("gemma3")
    enc = encoded(model, processor)
    sources, targets = enc.groups["question"], enc.groups["last"]
    types = model.config.get_text_config().layer_types
    rows = mu.knockout_sweep(model, enc, ["Question->Last", "Image->Last"], window=3, layers=[0, 1], engine="naive")
    answer = int(rows.answer_token.iloc[0])
    row = rows[(rows.flow == "Question->Last") & (rows.layer == 1)].iloc[0]
    layers = range(row.window_start, row.window_end + 1)
    assert abs(row.p_new - fc.oracle_p(model, enc, answer, sources, targets, layers, True)) <= 1e-6
    assert abs(row.p_new - fc.oracle_p(model, enc, answer, sources, targets, layers, False)) > 1e-4
    window_0 = rows[(rows.flow == "Image->Last") & (rows.layer == 0)].iloc[0]
    sliding = [j for j in range(window_0.window_start, window_0.window_end + 1) if types[j] == "sliding_attention"]
    assert list(range(window_0.window_start, window_0.window_end + 1)) == sliding
    assert enc.length - 1 - enc.groups["image"][-1] >= WINDOW and window_0.p_new == window_0.p_base


def test_gemma3_a_flow_that_empties_a_sliding_window_is_refused(replica_model):
    """image->image cuts every key of the later image tokens in the sliding layers (their window holds only image
    tokens): the rows would be undefined, so the sweep refuses, naming the position."""
    model, processor = replica_model("gemma3")
    enc = encoded(model, processor)
    first_empty = enc.groups["image"][0] + WINDOW - 1
    with pytest.raises(mu.MmflowError, match=f"every key of position {first_empty} in the sliding-window"):
        mu.knockout_sweep(model, enc, ["image->image"], window=3, engine="naive")
    assert mu.flow_positions("image->image", enc.groups, enc.length)  # well defined without the window


def crop_boxes(width, height, min_crop=PAS["pan_and_scan_min_crop_size"], most=PAS["pan_and_scan_max_num_crops"]):
    """Pan-and-scan crops (x0, y0, x1, y1), written out from its description: when the long side is at least 1.2
    times the short one, about one crop per aspect-ratio unit along the long side (2 to ``most``, each at least
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
    folder = build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "pas", layers=4, pan_and_scan=PAS)
    return mu.load_model(str(folder))


@pytest.mark.parametrize("size,box", [(SIZE, BOX), ((100, 260), (10, 100, 30, 30)), ((112, 112), (0, 0, 28, 28))])
def test_gemma3_pan_and_scan_views_union_and_per_view_groups(pan_and_scan, size, box):
    """With pan-and-scan on, the model sees the original and its crops, each framed and bidirectional on its own:
    the image and patch groups are the union over views, and each view is its own pair of patch groups."""
    model, processor = pan_and_scan
    crops = crop_boxes(*size)
    expected = [geometry.gemma3_squash(size, box)]
    for x0, y0, x1, y1 in crops:
        expected.append(geometry.gemma3_squash((x1 - x0, y1 - y0), (box[0] - x0, box[1] - y0, box[2], box[3])))
    labels = [fc._LABELS[float(v)] for v in mu.image_token_labels(model, processor, size, [box]).tolist()]
    flat = [label for view in expected for label in view]
    assert len(labels) == len(flat) and all(g == w or (w == "?" and g in "RO") for g, w in zip(labels, flat))
    enc = encoded(model, processor, size, box)
    ids, groups = enc.inputs["input_ids"][0].tolist(), enc.groups
    assert len(groups["image"]) == TOKENS * (1 + len(crops)) and len(groups["image_markers"]) == 2 * (1 + len(crops))
    assert enc.inputs["token_type_ids"][0].nonzero().flatten().tolist() == groups["image"]
    assert processor.tokenizer.decode([ids[p] for p in groups["question"]]) == fc.QUESTION
    names = ["original"] + [f"crop{k}" for k in range(1, len(crops) + 1)]
    for v, name in enumerate(names):
        positions = groups["image"][v * TOKENS : (v + 1) * TOKENS]
        related = [p for p, label in zip(positions, labels[v * TOKENS : (v + 1) * TOKENS]) if label == "R"]
        if crops:
            assert groups[f"related_patches@{name}"] == related
            assert sorted(groups[f"related_patches@{name}"] + groups[f"other_patches@{name}"]) == positions
        assert set(related) <= set(groups["related_patches"])
    assert crops or not [g for g in groups if "@" in g]  # one view: no per-view groups


def test_gemma3_pan_and_scan_naive_equals_the_per_view_oracle(pan_and_scan, tmp_path):
    """Naive equals the oracle with one bidirectional block per view; one block over all views is not the model."""
    model, processor = pan_and_scan
    enc = encoded(model, processor)
    assert "related_patches@crop2" in enc.groups and not enc.groups["related_patches@crop1"]
    plain = processor(images=fc.picture(SIZE, BOX), text=processor.image_token, return_tensors="pt")
    assert len(plain["pixel_values"]) == 1  # the processor call alone drops the checkpoint's pan-and-scan (5.23)
    flows = ["Image->Question", "Related patches->Question", "related_patches@crop2->last"]
    naive = mu.knockout_sweep(model, enc, flows, window=3, layers=[1, 3], engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        layers = range(row.window_start, row.window_end + 1)
        assert abs(row.p_new - fc.oracle_p(model, enc, answer, sources, targets, layers, True)) <= 1e-5, row.flow
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].double().softmax(-1)
    assert abs(fc.oracle_p(model, enc, answer, [], [], [], True) - probs[answer].item()) < 1e-6  # blocks per view
    image = enc.groups["image"]
    one_block = torch.zeros(enc.length, enc.length, dtype=torch.bool)
    one_block[torch.tensor(image)[:, None], torch.tensor(image)[None, :]] = True
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fc, "image_blocks", lambda n, positions: one_block)
        assert abs(fc.oracle_p(model, enc, answer, [], [], [], True) - probs[answer].item()) > 1e-5
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(model.name_or_path, str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


@pytest.mark.parametrize("softcap", [None, 1.0])
def test_gemma3_lens_paper_view_and_no_softcap(tmp_path, softcap):
    """The paper view's first entry is the embedding scaled by sqrt(hidden); Gemma3ForConditionalGeneration applies
    no final-logit softcap (transformers 5.23: only Gemma3ForCausalLM does), so neither does the lens."""
    model, processor = mu.load_model(str(build_tiny_gemma3(tmp_path / "g", layers=4, softcap=softcap)))
    assert model.config.get_text_config().final_logit_softcapping == softcap
    enc = encoded(model, processor)
    lens_matches_output(model, enc)
    with torch.inference_mode():
        logits = model(**enc.inputs).logits[0, -1]
    tokens = {"top": int(logits.argmax()), "other": 7}
    lens = mu.logit_lens(model, enc, tokens, views=tuple(mu.LENS_VIEWS))
    view = {label: part.pivot(index="layer", columns="token", values="prob") for label, part in lens.groupby("view")}
    head, text = model.get_output_embeddings(), mu.text_model(model)
    assert head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()  # tied
    if softcap is not None:
        assert logits.abs().max() > softcap  # uncapped
    with torch.inference_mode():
        scale = math.sqrt(model.config.text_config.hidden_size)
        embedded = text.embed_tokens.weight[enc.inputs["input_ids"][0, -1]] * scale
        assert abs(view[mu.PAPER_VIEW].loc[-1, "other"] - head(embedded).softmax(-1)[7].item()) < 1e-6
    for layer in range(mu.num_layers(model) - 1):
        assert abs(view[mu.RAW].loc[layer, "other"] - view[mu.PAPER_VIEW].loc[layer, "other"]) < 1e-7


def test_idefics3_loads_its_llama_text_model(replica_model):
    model, _ = replica_model("idefics3")
    assert models.text_model(model) is model.model.text_model and not hasattr(model.model, "language_model")
    assert type(models.text_model(model)).__name__ == "LlamaModel"
    assert models.final_norm(model) is model.model.text_model.norm


def test_smolvlm_without_num2words_is_refused_naming_it(replica_dir, monkeypatch):
    """SmolVLM2's processor needs the num2words package: without it the loader says so (an MmflowError naming the
    checkpoint and the package), before any weight loads."""
    from transformers.models.smolvlm import processing_smolvlm

    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(mu.MmflowError, match="processor cannot be loaded.*num2words"):
        models.load_processor(str(replica_dir("smolvlm")))


def test_a_missing_text_model_tensor_is_refused(replica_dir, tmp_path):
    """The strict loader checks the replica tensor by tensor: a checkpoint without one of the text model's tensors
    is refused, naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(replica_dir("idefics3"), broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(k for k in tensors if "text_model.layers.0.mlp" in k)
    save_file({k: v for k, v in tensors.items() if k != name}, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mu.MmflowError, match="lacks tensor"):
        mu.load_model(str(broken))


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_marker_sequence_and_views(replica_model, family):
    """The markers are the tile tags row by row, the newlines and the global image's tags, one block with the image
    tokens; the question right after it; the last views are the global image's tokens (``@global``)."""
    model, processor = replica_model(family)
    enc = encoded(model, processor)
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    tokens = tok.convert_ids_to_tokens(ids)
    fake, nl = "<fake_token_around_image>", tok.convert_ids_to_tokens(tok("\n")["input_ids"])
    expected = [fake, "<row_1_col_1>", fake, "<row_1_col_2>", *nl, fake, "<row_2_col_1>", fake, "<row_2_col_2>"]
    expected += [*nl, *nl, fake, "<global-img>", fake]
    assert [tokens[p] for p in groups["image_markers"]] == expected and len(groups["image"]) == 5 * TOKENS_PER_TILE
    block = range(groups["image_markers"][0], groups["image_markers"][-1] + 1)
    assert sorted(groups["image"] + groups["image_markers"]) == list(block) and groups["question"][0] == block[-1] + 1
    assert tokens[-1] == ":"
    glob = groups["image"][-TOKENS_PER_TILE:]
    for name in ("related_patches", "other_patches"):
        assert groups[f"{name}@global"] == [p for p in groups[name] if p in glob]
        assert groups[f"{name}@tiles"] == [p for p in groups[name] if p not in glob]
    shown, _ = base_patch_grid(model, processor, fc.picture(SIZE, BOX), [BOX])
    assert shown.shape == (TILE, TILE, 3)  # the overlay shows the global image


def test_a_tokenizer_that_adds_a_bos_does_not_double_the_templates(replica_dir):
    """Idefics3-8B's Llama-3 tokenizer puts its BOS in front of what it encodes, and the released template writes
    it too: the family's prompts are tokenized without adding another, so the input starts with one BOS."""
    from tokenizers.processors import TemplateProcessing

    skeleton, processor = models.load_processor(str(replica_dir("idefics3")))
    tok = processor.tokenizer
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    assert tok("<|im_start|>User:")["input_ids"][:2] == [bos, bos]  # this tokenizer alone would give two
    enc = mu.encode(processor, fc.picture(SIZE, BOX), fc.QUESTION, config=skeleton.config, inputs="paper")
    ids = enc.inputs["input_ids"][0].tolist()
    assert ids[0] == bos and bos not in ids[1:]
    assert tok.decode([ids[p] for p in enc.groups["question"]]) == fc.QUESTION


def test_an_image_not_split_is_the_global_view_only(replica_model, monkeypatch):
    """Without image splitting the image is one global tile: ``<fake><global-img>`` + its tokens + ``<fake>``;
    every patch group is the global view's and the tiles' groups are empty (a flow naming them is refused)."""
    from mmflow.knockout import has_empty_group

    model, processor = replica_model("idefics3")
    monkeypatch.setattr(processor.image_processor, "do_image_splitting", False)
    enc = encoded(model, processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0].tolist())
    markers = [tokens[p] for p in enc.groups["image_markers"]]
    assert markers == ["<fake_token_around_image>", "<global-img>", "<fake_token_around_image>"]
    assert len(enc.groups["image"]) == TOKENS_PER_TILE and enc.groups["related_patches@tiles"] == []
    assert enc.groups["related_patches@global"] == enc.groups["related_patches"] != []
    assert has_empty_group("related_patches@tiles->question", enc.groups)
    with pytest.raises(mu.MmflowError, match="empty group"):
        mu.knockout_sweep(model, enc, ["related_patches@tiles->question"], window=3)
