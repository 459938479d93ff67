"""Pixtral-12B (LLaVA with a Pixtral vision tower) and Mistral3 (Mistral-Small-3.1, 2x2 patch merger): tiny replicas
saved like hub folders and loaded through the normal loader; their prompt, groups, native-aspect patch geometry,
engines (against an independent oracle and each other), lens, check-data and a notebook; PaliGemma and Mllama
refused with the reason."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest
import torch
from test_family_qwen import QUESTION, oracle_p, picture
from tiny_pixtral import GEOMETRY, MISTRAL3_CHAT_TEMPLATE, PIXTRAL_CHAT_TEMPLATE, build_tiny_pixtral

import mmflow_utils as mu
from mmflow import models
from mmflow.patches import base_patch_grid

KINDS = ("pixtral", "mistral3")
FLOWS = list(mu.FLOWS) + ["image_markers->last", "image_markers->question", "true_option->last"]
SIZE, BOX = (150, 100), (90, 8, 40, 30)  # a box in the upper right of the image
OFFICIAL = f"<s>[INST][IMG]{QUESTION}\nAnswer the question using a single word or phrase.[/INST]"


@pytest.fixture(scope="module")
def pixtral_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixtral")
    return {kind: build_tiny_pixtral(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pixtral(pixtral_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mu.load_model(str(pixtral_dirs[kind]))
        return cache[kind]

    return get


def encoded_example(model, processor, inputs="paper", size=SIZE, box=BOX):
    enc = mu.encode(
        processor, picture(size, box), QUESTION, options=("left", "right"), config=model.config, inputs=inputs
    )
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def resized(kind, width, height):
    """Pixtral's resize rule, written out here from its description: scale down (never up) so that the longest side
    fits the longest edge (sides floored), then round each side up to whole cells."""
    patch, merge, edge = GEOMETRY[kind]
    cell = patch * merge
    ratio = max(height / edge, width / edge)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    return math.ceil(height / cell) * cell, math.ceil(width / cell) * cell, cell


def expected_labels(kind, size, box):
    """RELATED/OTHER per cell, row-major: a cell is related if a pixel of it samples (nearest neighbour, pixel
    centres) an original pixel inside the box."""
    (width, height), (x, y, w, h) = size, box
    rh, rw, cell = resized(kind, width, height)

    def hits(n_out, n_in, lo, hi):  # per output pixel: does its nearest source pixel lie in [lo, hi)?
        return [lo <= math.floor((i + 0.5) * n_in / n_out) < hi for i in range(n_out)]

    rows, cols = hits(rh, height, math.floor(y), math.ceil(y + h)), hits(rw, width, math.floor(x), math.ceil(x + w))
    return [
        mu.RELATED if any(rows[r * cell : (r + 1) * cell]) and any(cols[c * cell : (c + 1) * cell]) else mu.OTHER
        for r in range(rh // cell)
        for c in range(rw // cell)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_the_normal_loader(pixtral, pixtral_dirs, kind):
    import transformers

    model, processor = pixtral(kind)
    family = models.family_of(model)
    assert family.name == kind and type(model).__name__ == family.model_class
    assert type(processor).__name__ == "PixtralProcessor" and processor.image_token == "[IMG]"
    assert type(processor.image_processor).__name__ == "PixtralImageProcessorPil"
    assert processor.chat_template == {"pixtral": PIXTRAL_CHAT_TEMPLATE, "mistral3": MISTRAL3_CHAT_TEMPLATE}[kind]
    assert (processor.patch_size, processor.spatial_merge_size) == GEOMETRY[kind][:2]
    assert models.eager_attention(model) is transformers.models.mistral.modeling_mistral.eager_attention_forward
    # the PIL stand-in served one import only: the torchvision module's name is not left pointing at it
    stand_in = sys.modules.get("transformers.models.pixtral.image_processing_pixtral")
    assert stand_in is None or not stand_in.__name__.endswith("_pil_pixtral")
    skeleton, skeleton_processor = models.load_processor(str(pixtral_dirs[kind]))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)


def test_pixtral_is_told_from_llava_by_its_vision_tower(loaded):
    from transformers import PixtralVisionConfig

    model, _ = loaded("llava")
    assert models.family_of(model).name == "llava"  # a LlavaConfig with a CLIP tower stays plain LLaVA
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    assert models.family_of(config).name == "pixtral"


@pytest.mark.parametrize("kind", KINDS)
def test_paper_prompt_is_mistrals_official_format_and_groups(pixtral, kind):
    model, processor = pixtral(kind)
    enc = encoded_example(model, processor)
    assert enc.prompt == OFFICIAL
    processor_prompt = mu.encode(processor, picture(), QUESTION, config=model.config, inputs="processor").prompt
    if kind == "pixtral":  # the released chat template renders exactly the official format
        assert processor_prompt == OFFICIAL
    else:  # Mistral-Small-3.1's adds its default system prompt, with today's date
        assert processor_prompt.startswith("<s>[SYSTEM_PROMPT]You are Mistral Small 3") and processor_prompt.endswith(
            OFFICIAL[len("<s>") :]
        )
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # one BOS, though the prompt spells it
    rh, rw, cell = resized(kind, *SIZE)
    rows, cols = rh // cell, rw // cell
    expected = ((["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows)[:-1] + ["[IMG_END]"]  # row by row, then the end
    start = groups["image"][0]
    assert tok.convert_ids_to_tokens(ids[start : start + len(expected)]) == expected
    assert groups["image"] == [start + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    assert groups["image_markers"] == [start + r * (cols + 1) + cols for r in range(rows)]
    assert start == 2 and tok.convert_ids_to_tokens(ids[:2]) == ["<s>", "[INST]"]
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION
    assert groups["question"][0] == start + len(expected)  # the question right after [IMG_END]
    assert groups["last"] == [len(ids) - 1] and tok.convert_ids_to_tokens(ids[-1]) == "[/INST]"
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"
    assert list(enc.inputs["image_sizes"][0]) == [rh, rw]


def test_mistral3_tokenizer_would_add_a_second_bos(pixtral):
    """Mistral-Small-3.1's tokenizer puts <s> in front of what it encodes: without the rule that a prompt spelling
    its BOS gets none added, the official prompt (which spells <s>) would start with two (what the one-BOS assertion
    above rules out)."""
    _, processor = pixtral("mistral3")
    bos = processor.tokenizer.bos_token_id
    assert processor.tokenizer(OFFICIAL)["input_ids"][:3] == [
        bos,
        bos,
        processor.tokenizer.convert_tokens_to_ids("[INST]"),
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "size,box",
    [((150, 100), BOX), ((112, 84), (0, 0, 28, 28)), ((112, 84), (29, 57, 2, 2)), ((400, 260), (10, 200, 380, 30))],
)
def test_patch_labels_against_resize_arithmetic(pixtral, kind, size, box):
    model, processor = pixtral(kind)
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    assert labels == expected_labels(kind, size, box)
    assert 0 < labels.count(mu.RELATED) < len(labels)
    enc = encoded_example(model, processor, size=size, box=box)
    assert len(enc.groups["image"]) == len(labels)
    assert sorted(enc.groups["related_patches"] + enc.groups["other_patches"]) == enc.groups["image"]
    image, grid = base_patch_grid(model, processor, picture(size, box), [box])
    rh, rw, cell = resized(kind, *size)
    assert image.shape == (rh, rw, 3) and grid.shape == (rh // cell, rw // cell) and grid.flatten().tolist() == labels
    assert image[:, :, 0].max() > 200  # the red box survived


def test_a_processor_that_disagrees_with_the_models_cells_is_refused(pixtral, pixtral_dirs):
    _, processor = models.load_processor(str(pixtral_dirs["mistral3"]))
    model, _ = pixtral("mistral3")
    processor.spatial_merge_size = 1  # 14 px cells, where the model merges 2x2 patches into 28 px
    with pytest.raises(mu.MmflowError, match="14 px image-token cells.*28 px"):
        mu.image_token_labels(model, processor, SIZE, [BOX])


@pytest.mark.parametrize("kind", KINDS)
def test_naive_equals_an_oracle_with_explicit_masks(pixtral, kind):
    model, processor = pixtral(kind)
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
def test_fast_equals_naive(pixtral, kind, window, budget):
    model, processor = pixtral(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast_rows[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_fast_equals_naive_under_eager_attention(pixtral_dirs):
    model, processor = mu.load_model(str(pixtral_dirs["mistral3"]))
    model.set_attn_implementation("eager")
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="fast", token_budget=16)
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens_top_is_the_output(pixtral, kind):
    model, processor = pixtral(kind)
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


def test_check_data_on_the_replica(pixtral_dirs, tmp_path):
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(pixtral_dirs["mistral3"]), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(pixtral_dirs, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(pixtral_dirs["pixtral"]),
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
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0  # the overlay on the model's 16 px cells


def tiny_refused_configs():
    """Tiny configs of the two refused families (as their checkpoints' config.json would hold them)."""
    from transformers import MllamaConfig, PaliGemmaConfig, SiglipVisionConfig

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    paligemma = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
        text_config={"model_type": "gemma", **text},
    )
    mllama = MllamaConfig(text_config={**text, "cross_attention_layers": [1]})
    return {"paligemma": paligemma, "mllama": mllama}


@pytest.mark.parametrize(
    "name,reason",
    [("paligemma", "attends bidirectionally.*'X->Question'"), ("mllama", "cross-attention layers.*not self-attention")],
)
def test_paligemma_and_mllama_are_refused_with_the_reason(name, reason, tmp_path):
    config = tiny_refused_configs()[name]
    with pytest.raises(mu.MmflowError, match=f"refuses this family.*{reason}"):
        models.family_of(config)
    config.save_pretrained(tmp_path)
    with pytest.raises(mu.MmflowError, match="refuses this family"):  # the loader refuses before reading weights
        mu.load_model(str(tmp_path))
