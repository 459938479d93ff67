"""What only one family has, on the session's replicas (what every family shares: tests/test_families.py): Qwen's
M-RoPE positions (which the fast engine needs), Qwen3-VL's interleaved M-RoPE and DeepStack, Pixtral's break tokens and
BOS, OneVision's llava-hf template and downsampled features, InternVL's backbones, tiles and thumbnail, the processor
AutoProcessor builds where torchvision is present; PaliGemma and Mllama refused. Gemma 3 and Idefics3:
tests/test_family_specifics_views.py."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from test_families import fast_matches_naive, flows_of, lens_matches_output, naive_matches_oracle

import mmflow_utils as mu
from mmflow import families_check as fc
from mmflow import fast, models
from mmflow.replicas import build, geometry, replica
from mmflow.replicas.internvl import SYSTEM, TOKENS_PER_TILE
from mmflow.replicas.pixtral import GEOMETRY
from mmflow.replicas.qwen3 import DEEPSTACK

SIZE, BOX = replica("qwen2-vl").size, replica("qwen2-vl").box
MISTRAL = f"<s>[INST][IMG]{fc.QUESTION}\nAnswer the question using a single word or phrase.[/INST]"


def encoded(replica_model, family: str, size=None, box=None, inputs: str = "paper"):
    """The family's replica with the check's picture (or ``size`` / ``box``) encoded: (model, processor, enc)."""
    model, processor = replica_model(family)
    row = replica(family)
    return model, processor, fc.encode_picture(model, processor, size or row.size, box or row.box, inputs)


def test_fast_needs_the_models_own_m_rope_positions(replica_model, monkeypatch):
    """Text after the image is not at its token index under M-RoPE: with 1-D positions the fast engine would be
    wrong (what the agreement in test_families rules out)."""
    model, _, enc = encoded(replica_model, "qwen2-vl")
    rope = models.position_ids(model, enc.inputs)
    assert rope.shape == (3, enc.length) and rope[0, -1] < enc.length - 1
    grid = enc.inputs["image_grid_thw"][0].tolist()
    first, rows, cols = enc.groups["image"][0], grid[1] // 2, grid[2] // 2
    assert rope[1, enc.groups["image"]].tolist() == [first + r for r in range(rows) for _ in range(cols)]
    assert rope[2, enc.groups["image"]].tolist() == [first + c for _ in range(rows) for c in range(cols)]
    naive = mu.knockout_sweep(model, enc, ["Image->Question"], window=3, engine="naive")
    monkeypatch.setattr(fast, "position_ids", lambda m, inputs: torch.arange(inputs["input_ids"].shape[1])[None])
    wrong = mu.knockout_sweep(model, enc, ["Image->Question"], window=3, engine="fast")
    assert (naive.p_new - wrong.p_new).abs().max() > 1e-4


def test_with_torchvision_the_processor_is_autoprocessors(replica_dir, monkeypatch):
    """Where torchvision is installed the checkpoint's processor is built by AutoProcessor, as for every family."""
    import transformers
    import transformers.utils

    from mmflow.families import build_processor

    calls, folder = [], replica_dir("qwen2-vl")
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kw: calls.append(path) or "auto")
    config = transformers.AutoConfig.from_pretrained(folder)
    assert build_processor(str(folder), config, {"local_files_only": True}) == "auto" and calls == [str(folder)]


def test_qwen3_m_rope_positions_and_the_interleaved_layout(replica_model):
    """The model's own positions: image tokens share (t, h, w) = (p, p + row, p + col), text after the image
    advances by the grid's side; the rotary embedding interleaves the sections (frequency j reads h where
    j % 3 == 1 and j < 3 * section_h, w where j % 3 == 2 and j < 3 * section_w, t elsewhere)."""
    model, processor, enc = encoded(replica_model, "qwen3-vl")
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert models.deepstack_layers(model) == len(DEEPSTACK)
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


def test_deepstack_is_live_in_the_replica(replica_model):
    """DeepStack adds vision features to the first layers' outputs at the image positions after transformers
    records them: layer 1's real input differs from the recorded hidden state there, and only there."""
    model, _, enc = encoded(replica_model, "qwen3-vl")
    inputs = []
    handle = models.decoder_layers(model)[1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        with torch.inference_mode():
            recorded = model(**enc.inputs, output_hidden_states=True).hidden_states[1]
    finally:
        handle.remove()
    differs = (inputs[0][0] - recorded[0]).abs().amax(-1) > 1e-6
    assert differs.nonzero().flatten().tolist() == enc.groups["image"]


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3-vl-moe"])
def test_deepstack_naive_is_exact_for_image_targets_and_fast_refuses_them(replica_model, family, monkeypatch):
    """A flow whose targets are image tokens (the marker before the image): naive equals the oracle with DeepStack;
    fast would reuse hidden states recorded before the DeepStack addition, so it refuses, naming engine='naive' (one
    such flow among good ones is enough). Without the refusal it is wrong."""
    model, _, enc = encoded(replica_model, family)
    naive = naive_matches_oracle(model, enc, ["image_markers->image", "Image->Last"], bidirectional=False)
    with pytest.raises(mu.MmflowError, match=r"DeepStack.*engine='naive'"):
        mu.knockout_sweep(model, enc, ["image_markers->image"], window=3, engine="fast")
    with pytest.raises(mu.MmflowError, match=r"engine='naive'"):
        mu.knockout_sweep(model, enc, ["Image->Last", "image_markers->image"], window=3, engine="fast")
    monkeypatch.setattr(fast, "check_reusable_from", lambda *args: None)
    wrong = mu.knockout_sweep(model, enc, ["image_markers->image"], window=3, engine="fast")
    assert abs(naive[naive.flow == "image_markers->image"].p_new.to_numpy() - wrong.p_new.to_numpy()).max() > 1e-4


def test_pixtral_is_told_from_llava_by_its_vision_tower(replica_model):
    from transformers import PixtralVisionConfig

    model, _ = replica_model("llava")
    assert models.family_of(model).name == "llava"  # a LlavaConfig with a CLIP tower stays plain LLaVA
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    assert models.family_of(config).name == "pixtral"


@pytest.mark.parametrize("family", ["pixtral", "mistral3"])
def test_pixtral_rows_end_in_break_tokens(replica_model, family):
    """[IMG] row by row, each row but the last ending in [IMG_BREAK], then [IMG_END] (the markers), right after
    <s>[INST]; the question right after [IMG_END]; Mistral-Small-3.1's template adds its system prompt."""
    model, processor, enc = encoded(replica_model, family)
    assert type(processor.image_processor).__name__ == "PixtralImageProcessorPil"
    assert (processor.patch_size, processor.spatial_merge_size) == GEOMETRY[family][:2]
    stand_in = sys.modules.get("transformers.models.pixtral.image_processing_pixtral")  # the PIL stand-in: one import
    assert stand_in is None or not stand_in.__name__.endswith("_pil_pixtral")
    processor_prompt = mu.encode(processor, fc.picture(SIZE, BOX), fc.QUESTION, config=model.config).prompt
    if family == "mistral3":
        assert processor_prompt.startswith("<s>[SYSTEM_PROMPT]You are Mistral Small 3")
        assert processor_prompt.endswith(MISTRAL[len("<s>") :])
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    labels = geometry.pixtral_native(SIZE, BOX) if family == "pixtral" else geometry.mistral3_native(SIZE, BOX)
    rh, rw = (int(v) for v in enc.inputs["image_sizes"][0])
    cell = GEOMETRY[family][0] * GEOMETRY[family][1]
    rows, cols = rh // cell, rw // cell
    assert rows * cols == len(labels)
    expected = ((["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows)[:-1] + ["[IMG_END]"]
    start = groups["image"][0]
    assert start == 2 and tok.convert_ids_to_tokens(ids[: start + len(expected)]) == ["<s>", "[INST]", *expected]
    assert groups["image"] == [start + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    assert groups["image_markers"] == [start + r * (cols + 1) + cols for r in range(rows)]
    assert groups["question"][0] == start + len(expected) and tok.convert_ids_to_tokens(ids[-1]) == "[/INST]"


def test_mistral3_tokenizer_would_add_a_second_bos(replica_model):
    """Mistral-Small-3.1's tokenizer puts <s> in front of what it encodes: without the rule that a prompt spelling
    its BOS gets none added, the official prompt would start with two (what test_families' one-BOS check rules
    out)."""
    _, processor = replica_model("mistral3")
    bos = processor.tokenizer.bos_token_id
    inst = processor.tokenizer.convert_tokens_to_ids("[INST]")
    assert processor.tokenizer(MISTRAL)["input_ids"][:3] == [bos, bos, inst]


def test_a_processor_that_disagrees_with_the_models_cells_is_refused(replica_model, replica_dir):
    _, processor = models.load_processor(str(replica_dir("mistral3")))
    model, _ = replica_model("mistral3")
    processor.spatial_merge_size = 1  # 14 px cells, where the model merges 2x2 patches into 28 px
    with pytest.raises(mu.MmflowError, match="14 px image-token cells.*28 px"):
        mu.image_token_labels(model, processor, SIZE, [BOX])


def tiny_refused_configs():
    """Tiny configs of the two refused families (as their checkpoints' config.json would hold them)."""
    from transformers import MllamaConfig, PaliGemmaConfig, SiglipVisionConfig

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    paligemma = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
        text_config={"model_type": "gemma", **text},
    )
    return {"paligemma": paligemma, "mllama": MllamaConfig(text_config={**text, "cross_attention_layers": [1]})}


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


def test_onevision_processor_template_is_not_the_training_prompt(replica_model):
    model, processor = replica_model("llava-onevision")
    assert processor.num_image_tokens == 16 and processor.vision_feature_select_strategy == "full"
    prompt = mu.encode(processor, fc.picture(SIZE, BOX), fc.QUESTION, config=model.config).prompt
    assert prompt.startswith("<|im_start|>user <image>\n")  # llava-hf's template, not the paper's qwen_1_5 prompt


def test_onevision_downsampled_features_fast_equals_naive(replica_model):
    """A 220 x 220 image: its features are downsampled bilinearly (12 x 12 + newlines); both engines agree."""
    model, _, enc = encoded(replica_model, "llava-onevision", (220, 220), (10, 10, 30, 20))
    assert len(enc.groups["image"]) == 16 + 12 * 13
    flows = flows_of(enc)
    naive = mu.knockout_sweep(model, enc, flows, window=3, engine="naive")
    fast_matches_naive(model, enc, flows, naive, window=3, budget=16)


@pytest.mark.parametrize("backbone", ["llama", "qwen3"])
def test_internvl_other_backbones(tmp_path, backbone):
    """The replica's InternVL has a Qwen2 backbone; with Llama (under eager attention) and Qwen3 ones it loads with
    the backbone's own attention, naive == oracle, fast == naive, lens top == output."""
    import importlib

    row = replica("internvl")
    folder = build(dataclasses.replace(row, kwargs={**row.kwargs, "backbone": backbone}), tmp_path)
    model, processor = mu.load_model(str(folder))
    assert models.family_of(model).name == "internvl" and model.config.get_text_config().model_type == backbone
    module = importlib.import_module(f"transformers.models.{backbone}.modeling_{backbone}")
    assert models.eager_attention(model) is module.eager_attention_forward
    if backbone == "llama":
        model.set_attn_implementation("eager")
    enc = fc.encode_picture(model, processor, row.size, row.box)
    flows = flows_of(enc)
    naive = naive_matches_oracle(model, enc, flows, bidirectional=False)
    fast_matches_naive(model, enc, flows, naive, window=3, budget=16)
    lens_matches_output(model, enc)


@pytest.mark.parametrize("size,box", [(SIZE, BOX), ((84, 84), (30, 30, 10, 10)), ((60, 200), (5, 150, 20, 40))])
def test_internvl_tiles_and_thumbnail_groups(replica_model, size, box):
    """Per view: the tiles' tokens first, then the thumbnail's (only with more than one tile); each view's patch
    groups are its tokens with the geometry's label; the overlay shows the thumbnail."""
    model, processor, enc = encoded(replica_model, "internvl", size, box)
    groups, image = enc.groups, enc.groups["image"]
    labels = geometry.internvl(size, box)
    n_tiles = len(enc.inputs["pixel_values"])
    views = ["tiles"] * len(labels) if n_tiles == 1 else ["tiles"] * (len(labels) - TOKENS_PER_TILE)
    views += ["thumbnail"] * (len(labels) - len(views))
    assert len(image) == len(labels) == n_tiles * TOKENS_PER_TILE
    for name, label in (("related_patches", "R"), ("other_patches", "O")):
        for view in ("tiles", "thumbnail"):
            want = [p for p, lab, v in zip(image, labels, views) if lab == label and v == view]
            assert groups[f"{name}@{view}"] == want, (name, view)
    assert (groups["related_patches@thumbnail"] == []) == (n_tiles == 1)


def test_internvl_prompts_and_groups(replica_model):
    """Paper inputs: 2 x 2 crops and the thumbnail, the system message; processor inputs: the HF template sends no
    system message; the question comes after "</img>" and "\\n", also when encoded without the config."""
    for inputs in ("paper", "processor"):
        model, processor, enc = encoded(replica_model, "internvl", inputs=inputs)
        user = f"<|im_start|>user\n<IMG_CONTEXT>\n{fc.QUESTION}\n{mu.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
        assert enc.prompt == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if inputs == "paper" else "") + user
        assert len(enc.inputs["pixel_values"]) == 5
        assert enc.groups["question"][0] == enc.groups["image_markers"][1] + 2
    bare = mu.encode(processor, fc.picture(SIZE, BOX), fc.QUESTION, inputs="processor")  # no config: same offsets
    assert processor.tokenizer.decode(bare.inputs["input_ids"][0][bare.groups["question"]]) == fc.QUESTION


def test_internvl_patch_groups_refuse_a_kept_cls_token(replica_model, monkeypatch):
    """With vision_feature_select_strategy 'full' the tile's CLS would be a token: no 2 x 2 patch grid to label."""
    model, processor = replica_model("internvl")
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(mu.MmflowError, match="vision_feature_select_strategy='default'"):
        mu.image_token_labels(model, processor, SIZE, [BOX])
