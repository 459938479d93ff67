"""Every supported family on its tiny replica (one row of :data:`mmflow.replicas.REPLICAS` each, built and loaded once
per session): it loads as its family, its groups, its patch labels against the family's geometry written out
independently (:mod:`mmflow.replicas.geometry`, never the processor), the naive engine against the one oracle
(:func:`mmflow.families_check.oracle_p`: forward pre-hooks that set each layer's mask), the fast engine against the
naive one (or its refusal, by name), the logit lens against the output and check-data on a GQA-schema fixture. Every
notebook end to end on every replica: tests/test_replica_notebooks.py.

What only one family has (M-RoPE, DeepStack, Gemma 3's image block and sliding window, per-view groups, break tokens,
tiles) is in tests/test_family_specifics_*.py."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import mmflow_utils as mu
from mmflow import families_check as fc
from mmflow import models
from mmflow.families import family_of
from mmflow.knockout import has_empty_group
from mmflow.patches import base_patch_grid
from mmflow.replicas import REPLICAS, replica, resolve

FAMILIES = [row.family for row in REPLICAS]
INSTRUCTION = "Answer the question using a single word or phrase."
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    f"and polite answers to the user's questions. USER: <image>\n{fc.QUESTION} \n{INSTRUCTION} ASSISTANT:"
)
CHATML = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN = f"<|vision_start|><|image_pad|><|vision_end|>{fc.QUESTION}\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
MISTRAL = f"<s>[INST][IMG]{fc.QUESTION}\n{INSTRUCTION}[/INST]"
IDEFICS = f"<|im_start|>User:<image>{fc.QUESTION}\n{INSTRUCTION}<end_of_utterance>\nAssistant:"
#: Each family's paper prompt (its official format), written out here; the processor's own template renders the
#: same text for the families in SAME_AS_PROCESSOR.
PROMPTS = {
    "llava": VICUNA,
    "llava-next": VICUNA,
    "llava-onevision": f"{CHATML}<image>\n{fc.QUESTION}\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2-vl": CHATML + QWEN,
    "qwen2.5-vl": CHATML + QWEN,
    "qwen3-vl": "<|im_start|>user\n" + QWEN,
    "qwen3-vl-moe": "<|im_start|>user\n" + QWEN,
    "internvl": re.compile(
        rf"<\|im_start\|>system\n[^<]*InternVL[^<]*<\|im_end\|>\n<\|im_start\|>user\n<IMG_CONTEXT>\n"
        rf"{re.escape(fc.QUESTION)}\n{INSTRUCTION}<\|im_end\|>\n<\|im_start\|>assistant\n"
    ),
    "pixtral": MISTRAL,
    "mistral3": MISTRAL,
    "gemma3": (
        f"<bos><start_of_turn>user\n<start_of_image>{fc.QUESTION}\n{INSTRUCTION}<end_of_turn>\n<start_of_turn>model\n"
    ),
    "idefics3": IDEFICS,
    "smolvlm": IDEFICS,
}
SAME_AS_PROCESSOR = {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "pixtral", "gemma3", "idefics3", "smolvlm"}
#: The structural text tokens around or between each family's image tokens (its ``image_markers`` group, never in
#: ``image``), as patterns a marker token must match; each pattern is matched by at least one marker.
NEWLINE = r"Ċ"
MARKERS = {
    "qwen2-vl": [r"<\|vision_start\|>", r"<\|vision_end\|>"],
    "internvl": [r"<img>", r"</img>"],
    "pixtral": [r"\[IMG_BREAK\]", r"\[IMG_END\]"],
    "gemma3": [r"<start_of_image>", r"<end_of_image>"],
    "idefics3": [r"<fake_token_around_image>", r"<row_\d+_col_\d+>", r"<global-img>", NEWLINE],
}
MARKERS.update({name: MARKERS["qwen2-vl"] for name in ("qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")})
MARKERS.update({"mistral3": MARKERS["pixtral"], "smolvlm": MARKERS["idefics3"]})
#: Each family's processor class and (without torchvision) its PIL image processor class.
PROCESSORS = {
    "llava": ("LlavaProcessor", "CLIPImageProcessorPil"),
    "llava-next": ("LlavaNextProcessor", "LlavaNextImageProcessorPil"),
    "llava-onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessorPil"),
    "qwen2-vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessorPil"),
    "qwen2.5-vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil"),
    "qwen3-vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessorPil"),
    "qwen3-vl-moe": ("Qwen3VLProcessor", "Qwen2VLImageProcessorPil"),
    "internvl": ("InternVLProcessor", "GotOcr2ImageProcessorPil"),
    "pixtral": ("PixtralProcessor", "PixtralImageProcessorPil"),
    "mistral3": ("PixtralProcessor", "PixtralImageProcessorPil"),
    "gemma3": ("Gemma3Processor", "Gemma3ImageProcessorPil"),
    "idefics3": ("Idefics3Processor", "Idefics3ImageProcessorPil"),
    "smolvlm": ("SmolVLMProcessor", "SmolVLMImageProcessorPil"),
}
#: Pictures (size, box) whose patch labels are checked on every family, besides each replica's own: small and large,
#: tall and wide (tiles, grids, downsampling), tiny boxes on cell edges, a box over the whole width.
PICTURES = [
    ((112, 84), (0, 0, 28, 28)),
    ((112, 84), (29, 57, 2, 2)),
    ((400, 260), (10, 200, 380, 30)),
    ((90, 300), (10, 100, 20, 20)),
    ((105, 84), (3, 3, 60, 60)),
    ((60, 200), (5, 150, 20, 40)),
    ((300, 80), (100, 10, 40, 60)),
    ((220, 220), (150, 20, 50, 40)),
]
#: Pictures left out for a family, with the reason.
UNCHECKED: dict[tuple[str, tuple[int, int]], str] = {}
#: Pictures checked on one family only (where its own tests had them).
FAMILY_PICTURES = {
    "qwen3-vl": [((128, 96), (0, 0, 32, 32)), ((128, 96), (31, 63, 2, 2))],  # 32 px cells
    "internvl": [((84, 84), (30, 30, 10, 10)), ((150, 100), (0, 0, 150, 100))],  # one tile; everything related
    "gemma3": [((112, 112), (0, 0, 28, 28))],
    "idefics3": [((64, 64), (20, 20, 1, 1)), ((200, 60), (120, 0, 60, 20)), ((100, 150), (5, 100, 30, 40))],
    "smolvlm": [((100, 150), (5, 100, 30, 40))],
}
#: Smallest relative change (the largest over layers) every flow must reach, so that a knockout is seen to act.
EFFECT = 1e-4
#: Flows that cannot act on a replica, with the reason (every other flow must).
EFFECTLESS = {
    # Gemma 3's 4 layers are sliding, sliding, full, sliding (window 8): the question's change in the one full layer
    # cannot reach the last position, whose window in the layer after ends before the question
    ("gemma3", "Related patches->Question"),
}
LETTERS = {mu.RELATED: "R", mu.OTHER: "O", mu.NEITHER: "N"}


@pytest.fixture(scope="module", autouse=True)
def notebooks_meanwhile(request):
    """Where this session also runs tests/test_replica_notebooks.py, start its notebooks now in a background kernel:
    they run on another core while this module's tests (and the modules after it) run."""
    if any(item.path.name == "test_replica_notebooks.py" for item in request.session.items):
        request.getfixturevalue("replica_notebooks")


@pytest.fixture(scope="session")
def encoded(replica_model):
    """``encoded(family)``: the replica's picture encoded with the check's question and its patch groups (once)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            row = replica(family)
            cache[family] = fc.encode_picture(*replica_model(family), row.size, row.box, row.inputs)
        return cache[family]

    return get


def flows_of(enc) -> list[str]:
    """The paper's flows, one to the last position from a non-empty group of every other kind, and each view's."""
    flows = list(mu.FLOWS) + ["true_option->last"]
    if enc.groups["image_markers"]:
        flows += ["image_markers->last", "image_markers->question"]
    views = sorted(g for g in enc.groups if g.startswith("related_patches@") and enc.groups[g])
    return flows + [f"{view}->last" for view in views]


def naive_matches_oracle(model, enc, flows, bidirectional: bool, window: int = 3):
    """Run the naive sweep and assert every row equals the oracle within 1e-5 and every flow acts; return the rows."""
    naive = mu.knockout_sweep(model, enc, flows, window=window, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    for row in naive.itertuples():
        sources, targets = mu.flow_positions(row.flow, enc.groups)
        layers = range(row.window_start, row.window_end + 1)
        expected = fc.oracle_p(model, enc, answer, sources, targets, layers, bidirectional)
        assert abs(row.p_new - expected) <= 1e-5, (row.flow, row.layer, row.p_new, expected)
    effects = naive.groupby("flow").rel_change.apply(lambda r: r.abs().max())
    effects = effects.drop([flow for family, flow in EFFECTLESS if family == family_of(model).name], errors="ignore")
    assert effects.min() > EFFECT, effects.sort_values().head(3).to_dict()  # every flow does something
    return naive


def fast_matches_naive(model, enc, flows, naive, window: int, budget: int) -> None:
    """The fast engine gives the naive rows within 1e-5, or the family refuses it naming engine="naive"."""
    if family_of(model).fast_refusal:
        with pytest.raises(mu.MmflowError, match='engine="naive"'):
            mu.knockout_sweep(model, enc, flows, window=window, engine="fast", token_budget=budget)
        return
    fast = mu.knockout_sweep(model, enc, flows, window=window, engine="fast", token_budget=budget)
    assert (naive[["flow", "layer"]] == fast[["flow", "layer"]]).all().all()
    assert (naive.p_new - fast.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast.p_base).abs().max() <= 1e-6


def lens_matches_output(model, enc) -> None:
    """The lens's top layer is the model's output (final-norm and paper views) and, in the raw view, the head on the
    top layer's un-normed output; at layer 1 the raw and final-norm views are the head on the recorded hidden state,
    without and with the final norm."""
    last = []  # the top layer's raw output (hidden_states[-1] is after the final norm)
    hook = models.decoder_layers(model)[-1].register_forward_hook(
        lambda _m, _args, output: last.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.inference_mode():
            out = model(**enc.inputs, output_hidden_states=True)
    finally:
        hook.remove()
    probs = out.logits[0, -1].softmax(-1)
    tokens = {"top": int(probs.argmax()), "other": 7}
    lens = mu.logit_lens(model, enc, tokens, views=tuple(mu.LENS_VIEWS))
    n = mu.num_layers(model)
    view = {label: part.pivot(index="layer", columns="token", values="prob") for label, part in lens.groupby("view")}
    assert set(view) == {mu.RAW, mu.WITH_NORM, mu.PAPER_VIEW} and set(range(n)) <= set(view[mu.RAW].index)
    for label in (mu.WITH_NORM, mu.PAPER_VIEW):
        assert abs(view[label].loc[n - 1, "top"] - probs[tokens["top"]].item()) < 1e-6, label
    head, norm = model.get_output_embeddings(), models.final_norm(model)
    with torch.inference_mode():
        raw_top = head(last[0][:, -1])[0].softmax(-1)[tokens["top"]].item()
        assert abs(view[mu.RAW].loc[n - 1, "top"] - raw_top) < 1e-6  # the raw view: no final norm, even on top
        h = out.hidden_states[2][:, -1]  # the raw output of layer 1 at the last position
        assert abs(view[mu.RAW].loc[1, "other"] - head(h)[0].softmax(-1)[7].item()) < 1e-6
        assert abs(view[mu.WITH_NORM].loc[1, "other"] - head(norm(h))[0].softmax(-1)[7].item()) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_its_family_through_the_normal_loader(replica_model, replica_dir, family):
    from transformers.utils import is_torchvision_available

    model, processor = replica_model(family)
    own = family_of(model)
    assert own.name == family and type(model).__name__ == own.model_class
    assert type(processor).__name__ == PROCESSORS[family][0]
    if not is_torchvision_available():  # PIL image processors; no video processor, not even None
        assert type(processor.image_processor).__name__ == PROCESSORS[family][1]
        if own.image_only_processor:  # built from its image processor, tokenizer and chat template only
            assert "video_processor" not in type(processor).get_attributes()
    attention = sys.modules[type(models.decoder_layers(model)[0].self_attn).__module__]
    assert models.eager_attention(model) is attention.eager_attention_forward  # the backbone's own, not Llama's
    assert models.num_layers(model) == replica(family).kwargs["layers"]
    skeleton, skeleton_processor = models.load_processor(str(replica_dir(family)))
    assert next(skeleton.parameters()).device.type == "meta" and type(skeleton_processor) is type(processor)
    assert family_of(skeleton).name == family


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_prompt_and_groups(replica_model, encoded, family):
    """The paper prompt is the family's official format; image tokens are the model's image token, the markers
    exactly the family's structural tokens (contiguous with the image), the question, options and last position
    decode to what they name; a family without markers has an empty group that a sweep refuses by name."""
    model, processor = replica_model(family)
    enc, row = encoded(family), replica(family)
    expected = PROMPTS[family]
    assert expected.fullmatch(enc.prompt) if isinstance(expected, re.Pattern) else enc.prompt == expected
    processor_prompt = mu.encode(processor, fc.picture(row.size, row.box), fc.QUESTION, config=model.config).prompt
    assert (processor_prompt == enc.prompt) == (family in SAME_AS_PROCESSOR)
    ids, groups, tok = enc.inputs["input_ids"][0].tolist(), enc.groups, processor.tokenizer
    image, markers = groups["image"], groups["image_markers"]
    assert image and {ids[p] for p in image} == {model.config.image_token_id}
    assert tok.decode([ids[p] for p in groups["question"]]) == fc.QUESTION
    assert groups["last"] == [len(ids) - 1] and image[-1] < groups["question"][0]
    assert tok.decode([ids[p] for p in groups["true_option"]]).strip() == "left"
    assert tok.decode([ids[p] for p in groups["false_option"]]).strip() == "right"
    if tok.bos_token_id in ids:  # one BOS, first, though some prompts spell it and some tokenizers add one
        assert ids.index(tok.bos_token_id) == 0 and ids.count(tok.bos_token_id) == 1
    for key in ("mm_token_type_ids", "token_type_ids"):  # where the processor marks the image tokens
        if key in enc.inputs:
            assert enc.inputs[key][0].nonzero().flatten().tolist() == image, key
    if family not in MARKERS:
        assert markers == [] and has_empty_group("image_markers->last", groups)
        with pytest.raises(mu.MmflowError, match="empty group"):
            mu.knockout_sweep(model, enc, ["image_markers->last"], window=3)
        return
    names = tok.convert_ids_to_tokens([ids[p] for p in markers])
    patterns = [re.compile(p) for p in MARKERS[family]]
    assert all(any(p.fullmatch(name) for p in patterns) for name in names), names
    assert all(any(p.fullmatch(name) for name in names) for p in patterns), names
    block = sorted(image + markers)
    assert block == list(range(block[0], block[-1] + 1)) and markers[-1] > image[-1]
    assert not set(markers) & set(groups["question"]) and not set(markers) & set(image)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_labels_against_the_written_out_geometry(replica_model, family):
    """On the replica's picture and each of PICTURES: every image token's label is what the family's geometry says
    (an edge cell "?" may go either way), related and other patches split the image group (and each view's groups
    its union), and the overlay's grid is one view's labels."""
    model, processor = replica_model(family)
    row = replica(family)
    geometry = resolve(row.geometry)
    pictures = [(row.size, row.box), *PICTURES, *FAMILY_PICTURES.get(family, [])]
    for size, box in [(size, box) for size, box in pictures if (family, size) not in UNCHECKED]:
        got = [LETTERS[float(v)] for v in mu.image_token_labels(model, processor, size, [box], row.inputs).tolist()]
        want = geometry(size, box)
        assert len(got) == len(want), (size, box)
        wrong = [i for i, (g, w) in enumerate(zip(got, want)) if g != w and not (w == "?" and g in "RO")]
        assert not wrong and "R" in got, (size, box, wrong[:5])
        enc = fc.encode_picture(model, processor, size, box, row.inputs)
        groups = enc.groups
        assert len(groups["image"]) == len(got), (size, box)
        assert sorted(groups["related_patches"] + groups["other_patches"]) == sorted(
            p for p, label in zip(groups["image"], got) if label != "N"
        )
        assert groups["related_patches"] == [p for p, label in zip(groups["image"], got) if label == "R"]
        for name in ("related_patches", "other_patches"):
            views = [g for g in groups if g.startswith(f"{name}@")]
            if views:
                assert sorted(p for view in views for p in groups[view]) == groups[name], (size, box, name)
        shown, grid = base_patch_grid(model, processor, fc.picture(size, box), [box], row.inputs)
        flat = [LETTERS[float(v)] for v in grid.flatten().tolist()]
        assert flat in (got[: len(flat)], got[-len(flat) :]), (size, box)
        cell = shown.shape[0] / grid.shape[0]  # the view is whole square cells of the grid
        assert cell == int(cell) and shown.shape[1] == cell * grid.shape[1], (size, box, shown.shape, grid.shape)
        assert shown[:, :, 0].max() > 200 or box[2] * box[3] < 10, (size, box)  # the red box survived


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_equals_the_oracle_and_fast_equals_naive(replica_model, encoded, family):
    """Every flow of :func:`flows_of`, window 3: naive == oracle; then fast == naive with a 16-token budget (many
    chunks) and with window 5 and a large budget, or the family's refusal naming the naive engine."""
    model, _ = replica_model(family)
    enc, flows = encoded(family), flows_of(encoded(family))
    naive = naive_matches_oracle(model, enc, flows, replica(family).bidirectional_image)
    fast_matches_naive(model, enc, flows, naive, window=3, budget=16)
    wide = mu.knockout_sweep(model, enc, flows, window=5, engine="naive")
    fast_matches_naive(model, enc, flows, wide, window=5, budget=4096)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "mistral3", "idefics3", "gemma3"])
def test_under_eager_attention(replica_dir, family):
    """Under eager attention the knockout wraps the backbone's own attention function: naive == oracle (Gemma 3:
    sliding layers, image block) and fast == naive (or refused)."""
    model, processor = mu.load_model(str(replica_dir(family)))
    model.set_attn_implementation("eager")
    row = replica(family)
    enc = fc.encode_picture(model, processor, row.size, row.box, row.inputs)
    flows = flows_of(enc)
    naive = naive_matches_oracle(model, enc, flows, row.bidirectional_image)
    fast_matches_naive(model, enc, flows, naive, window=3, budget=16)
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_top_is_the_output(replica_model, encoded, family):
    lens_matches_output(replica_model(family)[0], encoded(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_check_data_on_the_replica(replica_dir, tmp_path, family):
    """make check-data's path: the geometry from a weightless skeleton agrees with the processor on every row."""
    from gqa_fixture import build_gqa

    from mmflow.check_data import check_rows

    csvs, images, total = build_gqa(tmp_path)
    rows = check_rows(str(replica_dir(family)), str(csvs), str(images))
    assert len(rows) == total and rows.usable.all() and (rows.related > 0).all() and (rows.other > 0).any()


@pytest.mark.parametrize("n_in, steps", [(84, [102, 128]), (105, [128, 128]), (300, [128, 128, 64]), (60, [38, 64])])
def test_written_out_resize_chain_leaves_open_only_what_pil_decides_by_rounding(n_in, steps):
    """The geometry's nearest-neighbour chain is exact arithmetic: where it is decided, PIL's resize samples a pixel
    on the same side of every box edge; it is undecided (None) only at exact ties of a pixel centre on a source pixel
    boundary, which PIL's floating point resolves either way (84 -> 102 -> 128: rows 95-96)."""
    import numpy as np
    from PIL import Image

    from mmflow.replicas.geometry import _chained_hits

    image = Image.fromarray(np.arange(n_in, dtype=np.int32).reshape(n_in, 1), mode="I")
    for n in steps:
        image = image.resize((1, n), Image.NEAREST)
    sampled = np.array(image)[:, 0]
    undecided = 0
    for lo in range(n_in):
        for hi in (lo + 1, n_in):
            hits = _chained_hits(n_in, steps, lo, hi)
            pil = [bool(lo <= s < hi) for s in sampled]
            assert all(h is None or h == p for h, p in zip(hits, pil)), (lo, hi)
            undecided += hits.count(None)
    if (n_in, steps) == (84, [102, 128]):
        assert _chained_hits(84, [102, 128], 3, 63)[95:97] == [None, None] and sampled[95] == 62
        assert undecided > 0
