"""Idefics3 (the class of SmolVLM v1) and SmolVLM2: tiny replicas saved like hub folders and loaded through the
normal loader; their prompt, groups (image tokens apart from the tile tags, global tag and newlines), tile + global
patch geometry against written-out arithmetic, per-view groups, engines (against an independent oracle and each
other), lens."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_family_qwen import QUESTION, oracle_p, picture
from tiny_idefics3 import LONGEST, PATCH, SCALE, SMOLVLM_CHAT_TEMPLATE, TILE, TOKENS_PER_TILE, build_tiny_idefics3

import mmflow_utils as mu
from mmflow import models
from mmflow.patches import base_patch_grid

FLOWS = list(mu.FLOWS) + [
    "image_markers->last",
    "image_markers->question",
    "related_patches@global->question",
    "related_patches@tiles->question",
    "true_option->last",
]
SIZE, BOX = (150, 100), (90, 8, 40, 30)  # a box in the upper right: 2 x 2 tiles + the global image
CELL = PATCH * SCALE  # the pixels of one image token in its tile


KINDS = ("idefics3", "smolvlm")


@pytest.fixture(scope="module")
def num2words_stub():
    """SmolVLM's processor refuses to start without the num2words package, which only its video prompts call (to
    spell out a frame count); where it is not installed a stub stands in, for this module only."""
    from transformers.models.smolvlm import processing_smolvlm

    with pytest.MonkeyPatch.context() as patch:
        if processing_smolvlm.num2words is None:
            patch.setattr(processing_smolvlm, "num2words", str)
        yield


@pytest.fixture(scope="module")
def idefics3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    return {kind: build_tiny_idefics3(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def idefics3_dir(idefics3_dirs):
    return idefics3_dirs["idefics3"]


@pytest.fixture(scope="module")
def family(idefics3_dirs, num2words_stub):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mu.load_model(str(idefics3_dirs[kind]))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def idefics3(family):
    return family("idefics3")


def encoded_example(model, processor, inputs="paper", size=SIZE, box=BOX):
    enc = mu.encode(
        processor, picture(size, box), QUESTION, options=("left", "right"), config=model.config, inputs=inputs
    )
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def processed_size(width, height):
    """Idefics3's two resizes, written out from their description: the longest edge to ``LONGEST`` (the other side
    by the aspect ratio, truncated, made even), then both sides up to whole tiles (the short side recomputed from the
    aspect ratio first). Returns ((w1, h1), (w2, h2))."""
    if width >= height:
        w1, h1 = LONGEST, int(LONGEST / (width / height))
        h1 += h1 % 2
    else:
        h1, w1 = LONGEST, int(LONGEST * (width / height))
        w1 += w1 % 2
    aspect = w1 / h1
    if w1 >= h1:
        w2 = math.ceil(w1 / TILE) * TILE
        h2 = math.ceil(int(w2 / aspect) / TILE) * TILE
    else:
        h2 = math.ceil(h1 / TILE) * TILE
        w2 = math.ceil(int(h2 * aspect) / TILE) * TILE
    return (w1, h1), (w2, h2)


def nearest(n_out, n_in):
    """Nearest-neighbour resampling of an axis (pixel centres): the source index of each output pixel."""
    return [math.floor((i + 0.5) * n_in / n_out) for i in range(n_out)]


def expected_labels(size, box):
    """RELATED/OTHER per image token: the tiles row-major (each tile's 16 px cells row-major), then the global image
    (the tiled image squashed to one tile). A cell is related if a pixel of it samples, through the chain of
    nearest-neighbour resizes, an original pixel inside the box. Returns (labels, rows, cols)."""
    (width, height), (x, y, w, h) = size, box
    (w1, h1), (w2, h2) = processed_size(width, height)

    def axis(n_in, n1, n2, lo, hi, n_out=None):  # per pixel of the tiled axis (or of its squash to n_out)
        first, second = nearest(n1, n_in), nearest(n2, n1)
        chain = [first[second[i]] for i in range(n2)]
        if n_out is not None:
            chain = [chain[j] for j in nearest(n_out, n2)]
        return [lo <= source < hi for source in chain]

    lo_x, hi_x, lo_y, hi_y = math.floor(x), math.ceil(x + w), math.floor(y), math.ceil(y + h)
    rows, cols = h2 // TILE, w2 // TILE
    xs, ys = axis(width, w1, w2, lo_x, hi_x), axis(height, h1, h2, lo_y, hi_y)
    gx, gy = axis(width, w1, w2, lo_x, hi_x, TILE), axis(height, h1, h2, lo_y, hi_y, TILE)
    side = TILE // CELL

    def tile(hit_y, hit_x, top, left):
        return [
            mu.RELATED
            if any(hit_y[top + r * CELL : top + (r + 1) * CELL]) and any(hit_x[left + c * CELL : left + (c + 1) * CELL])
            else mu.OTHER
            for r in range(side)
            for c in range(side)
        ]

    labels = [lab for r in range(rows) for c in range(cols) for lab in tile(ys, xs, r * TILE, c * TILE)]
    return labels + tile(gy, gx, 0, 0), rows, cols


@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_the_normal_loader(family, idefics3_dirs, kind):
    import transformers
    from transformers.utils import is_torchvision_available

    model, processor = family(kind)
    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[kind]
    assert models.family_of(model).name == kind and models.text_model(model) is model.model.text_model
    assert type(models.text_model(model)).__name__ == "LlamaModel" and not hasattr(model.model, "language_model")
    assert type(processor).__name__ == f"{prefix}Processor" and processor.image_seq_len == TOKENS_PER_TILE
    assert type(processor.image_processor).__name__ == f"{prefix}ImageProcessorPil"
    if kind == "smolvlm" and not is_torchvision_available():  # image-only: no video processor, not even None
        assert "video_processor" not in type(processor).get_attributes()
    assert processor.chat_template == SMOLVLM_CHAT_TEMPLATE and models.num_layers(model) == 6
    assert models.eager_attention(model) is transformers.models.llama.modeling_llama.eager_attention_forward
    assert models.final_norm(model) is model.model.text_model.norm
    skeleton, skeleton_processor = models.load_processor(str(idefics3_dirs[kind]))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)


def test_smolvlm_without_num2words_is_refused_naming_it(idefics3_dirs, monkeypatch):
    """SmolVLM2's processor needs the num2words package: without it the loader says so (an MmflowError naming the
    checkpoint and the package), before any weight loads."""
    from transformers.models.smolvlm import processing_smolvlm

    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(mu.MmflowError, match="processor cannot be loaded.*num2words"):
        models.load_processor(str(idefics3_dirs["smolvlm"]))


def test_a_missing_text_model_tensor_is_refused(idefics3_dir, tmp_path):
    """The strict loader checks the replica tensor by tensor: a checkpoint without one of the text model's
    tensors is refused, naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(idefics3_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(k for k in tensors if "text_model.layers.0.mlp" in k)
    save_file({k: v for k, v in tensors.items() if k != name}, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mu.MmflowError, match="lacks tensor"):
        mu.load_model(str(broken))


@pytest.mark.parametrize("kind", KINDS)
def test_paper_prompt_is_the_official_template_and_groups(family, kind):
    model, processor = family(kind)
    enc = encoded_example(model, processor)
    assert enc.prompt == (
        f"<|im_start|>User:<image>{QUESTION}\nAnswer the question using a single word or phrase.<end_of_utterance>\n"
        "Assistant:"
    )
    assert enc.prompt == mu.encode(processor, picture(), QUESTION, config=model.config, inputs="processor").prompt
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(groups["image"]) == 5 * TOKENS_PER_TILE and {tokens[p] for p in groups["image"]} == {"<image>"}
    fake, nl = "<fake_token_around_image>", tok.convert_ids_to_tokens(tok("\n")["input_ids"])
    expected = [fake, "<row_1_col_1>", fake, "<row_1_col_2>", *nl, fake, "<row_2_col_1>", fake, "<row_2_col_2>"]
    expected += [*nl, *tok.convert_ids_to_tokens(tok("\n")["input_ids"]), fake, "<global-img>", fake]
    assert [tokens[p] for p in groups["image_markers"]] == expected
    block = range(groups["image_markers"][0], groups["image_markers"][-1] + 1)  # markers and image: one block
    assert sorted(groups["image"] + groups["image_markers"]) == list(block)
    assert tok.decode([ids[p] for p in groups["question"]]) == QUESTION and groups["question"][0] == block[-1] + 1
    assert groups["last"] == [len(ids) - 1] and tokens[-1] == ":"
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"


def test_a_tokenizer_that_adds_a_bos_does_not_double_the_templates(idefics3_dir):
    """Idefics3-8B's Llama-3 tokenizer puts its BOS in front of what it encodes, and the released template writes
    it too: the family's prompts are tokenized without adding another, so the input starts with one BOS."""
    from tokenizers.processors import TemplateProcessing

    skeleton, processor = models.load_processor(str(idefics3_dir))
    tok = processor.tokenizer
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    assert tok("<|im_start|>User:")["input_ids"][:2] == [bos, bos]  # this tokenizer alone would give two
    enc = mu.encode(processor, picture(), QUESTION, config=skeleton.config, inputs="paper")
    ids = enc.inputs["input_ids"][0].tolist()
    assert ids[0] == bos and bos not in ids[1:]
    assert tok.decode([ids[p] for p in enc.groups["question"]]) == QUESTION


@pytest.mark.parametrize(
    "kind,size,box",
    [
        ("idefics3", SIZE, BOX),
        ("idefics3", (100, 150), (5, 100, 30, 40)),
        ("idefics3", (200, 60), (120, 0, 60, 20)),
        ("idefics3", (64, 64), (20, 20, 1, 1)),
        ("smolvlm", (100, 150), (5, 100, 30, 40)),
    ],
)
def test_patch_labels_against_tile_arithmetic(family, kind, size, box):
    model, processor = family(kind)
    labels = mu.image_token_labels(model, processor, size, [box]).tolist()
    expected, rows, cols = expected_labels(size, box)
    assert labels == expected and len(labels) == (rows * cols + 1) * TOKENS_PER_TILE
    assert 0 < labels.count(mu.RELATED) < len(labels)
    enc = encoded_example(model, processor, size=size, box=box)
    groups, image = enc.groups, enc.groups["image"]
    assert len(image) == len(labels) and sorted(groups["related_patches"] + groups["other_patches"]) == image
    tiles, glob = image[: rows * cols * TOKENS_PER_TILE], image[rows * cols * TOKENS_PER_TILE :]
    for kind in ("related_patches", "other_patches"):  # the union, and each view on its own
        assert groups[f"{kind}@tiles"] == [p for p in groups[kind] if p in tiles]
        assert groups[f"{kind}@global"] == [p for p in groups[kind] if p in glob]
    picture_, grid = base_patch_grid(model, processor, picture(size, box), [box])
    assert picture_.shape == (TILE, TILE, 3) and grid.flatten().tolist() == labels[-TOKENS_PER_TILE:]


def test_an_image_not_split_is_the_global_view_only(idefics3, monkeypatch):
    """Without image splitting the image is one global tile: ``<fake><global-img>`` + its tokens + ``<fake>``;
    every patch group is the global view's and the tiles' groups are empty (a flow naming them is skipped)."""
    model, processor = idefics3
    monkeypatch.setattr(processor.image_processor, "do_image_splitting", False)
    enc = encoded_example(model, processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(enc.inputs["input_ids"][0].tolist())
    markers = [tokens[p] for p in enc.groups["image_markers"]]
    assert markers == ["<fake_token_around_image>", "<global-img>", "<fake_token_around_image>"]
    assert len(enc.groups["image"]) == TOKENS_PER_TILE and enc.groups["related_patches@tiles"] == []
    assert enc.groups["related_patches@global"] == enc.groups["related_patches"] != []
    from mmflow.knockout import has_empty_group

    assert has_empty_group("related_patches@tiles->question", enc.groups)
    with pytest.raises(mu.MmflowError, match="empty group"):
        mu.knockout_sweep(model, enc, ["related_patches@tiles->question"], window=3)


@pytest.mark.parametrize("kind", KINDS)
def test_naive_equals_an_oracle_with_explicit_masks(family, kind):
    model, processor = family(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(model, enc, answer, sources, targets, range(row.window_start, row.window_end + 1))
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3  # every flow does something


@pytest.mark.parametrize("kind,window,budget", [("idefics3", 3, 16), ("idefics3", 5, 4096), ("smolvlm", 3, 16)])
def test_fast_equals_naive(family, kind, window, budget):
    model, processor = family(kind)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast_rows[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast_rows.p_base).abs().max() <= 1e-6


def test_fast_equals_naive_under_eager_attention(idefics3_dir):
    """Under eager attention the knockout wraps the Llama backbone's own attention function: both engines agree."""
    model, processor = mu.load_model(str(idefics3_dir))
    model.set_attn_implementation("eager")
    assert model.config.get_text_config()._attn_implementation == "eager"
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="naive")
    fast_rows = mu.knockout_sweep(model, enc, FLOWS, window=3, engine="fast", token_budget=16)
    assert (naive.p_new - fast_rows.p_new).abs().max() <= 1e-5
    for row in naive[naive.flow == "Image->Question"].itertuples():  # and the naive one matches the oracle
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        expected = oracle_p(
            model, enc, int(row.answer_token), sources, targets, range(row.window_start, row.window_end + 1)
        )
        assert abs(row.p_new - expected) <= 1e-5, row.layer


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens_top_is_the_output(family, kind):
    model, processor = family(kind)
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
    head, norm = model.get_output_embeddings(), model.model.text_model.norm
    with torch.inference_mode():
        h = out.hidden_states[2][:, -1]  # the raw output of layer 1
        assert abs(view[mu.RAW].loc[1, "other"] - head(h)[0].softmax(-1)[7].item()) < 1e-6
        assert abs(view[mu.WITH_NORM].loc[1, "other"] - head(norm(h))[0].softmax(-1)[7].item()) < 1e-6


def test_check_data_on_the_replica(idefics3_dir, tmp_path):
    """make check-data's path: the geometry from a weightless skeleton (its pixel shuffle) agrees with the
    processor's image tokens on every row."""
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(idefics3_dir), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


def test_patch_groups_notebook_end_to_end(idefics3_dir, tmp_path):
    from test_notebooks import execute

    out = tmp_path / "figures"
    execute(
        "3_patch_groups",
        tmp_path / "3.ipynb",
        model=str(idefics3_dir),
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
    assert (out / f"{mu.FIG_PATCH_EXAMPLE}.png").stat().st_size > 0  # the overlay on the global image's tokens
