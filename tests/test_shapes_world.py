"""Fast tests of the shapes world data, the shapes-llava tokenizer/processor, its training and its checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmflow.paper import llava15_prompt
from shapes_world import world

GQA_COLUMNS = [
    "question_id", "img_id", "task", "question", "answer", "true option", "false option",
    "central object name", "central object x", "central object y", "central object w", "central object h",
    "object1 name", "object1 x", "object1 y", "object1 w", "object1 h",
    "object2 name", "object2 x", "object2 y", "object2 w", "object2 h",
    "image_w", "image_h", "image",
]  # fmt: skip
CHECKPOINT = Path(world.__file__).parent / "shapes-llava"


@pytest.fixture(scope="module")
def dataset():
    return world.make_dataset(24, seed=123)


def examples(task: str, n: int = 60) -> list[world.SceneQuestion]:
    return [world.sample(task, (99, i)) for i in range(n)]


def test_schema(dataset):
    assert dataset.column_names == GQA_COLUMNS
    assert dataset.features["image"].__class__.__name__ == "Image"
    assert len(set(dataset["question_id"])) == len(dataset)
    assert set(dataset["task"]) == set(world.TASKS)
    for row in dataset:
        assert row["image"].mode == "RGB" and row["image"].size == (row["image_w"], row["image_h"]) == (64, 64)
        assert row["answer"] == row["answer"].lower() and len(row["answer"].split()) == 1
        choose = row["task"].startswith("Choose")
        assert (row["true option"] is not None) == choose and (row["false option"] is not None) == choose
        if choose:
            assert row["true option"] == row["answer"] != row["false option"]
        central = row["task"] in ("ChooseAttr", "ChooseCat", "QueryAttr")
        assert (row["central object name"] is not None) == central
        assert (row["object1 name"] is not None) == (not central)
        if central:
            assert isinstance(row["central object x"], float) and row["central object w"] > 0
        elif row["task"] != "LogicalObj":
            assert row["object1 w"] > 0 and row["object2 w"] > 0


def test_determinism(dataset):
    again = world.make_dataset(24, seed=123)
    other = world.make_dataset(24, seed=124)
    for a, b in zip(dataset, again):
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert dataset["question"] != other["question"]


def test_eval_split_is_answer_balanced():
    ds = world.make_dataset(24).select_columns(["task", "answer"])
    for task in world.TASKS:
        counts = Counter(r["answer"] for r in ds if r["task"] == task)
        if task == "ChooseAttr":
            assert counts["metal"] == counts["rubber"] and counts["small"] == counts["large"]
        else:
            assert len(set(counts.values())) == 1, (task, counts)


@pytest.mark.parametrize("task", world.TASKS)
def test_boxes_are_tight_and_coloured(task):
    background = np.array(world.BACKGROUND, dtype=float)
    for ex in examples(task, 15):
        pixels = np.asarray(ex.image, dtype=float)
        foreground = np.abs(pixels - background).max(axis=-1) > 6 * world.NOISE_STD
        covered = np.zeros_like(foreground)
        for obj in ex.objects:
            x, y, w, h = (int(v) for v in ex.boxes[obj.shape])
            box = foreground[y : y + h, x : x + w]
            covered[y : y + h, x : x + w] = True
            # tight: every border row and column of the box holds object pixels
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            # inside its grid cell, hence in one image half
            assert x // world.CELL == obj.cell[0] == (x + w - 1) // world.CELL
            # the object's pixels have the object's colour (nearest palette colour by chromaticity)
            mean = pixels[y : y + h, x : x + w][box].mean(axis=0)
            chroma = {name: np.array(rgb) / np.linalg.norm(rgb) for name, rgb in world.COLORS.items()}
            nearest = min(chroma, key=lambda name: np.linalg.norm(mean / np.linalg.norm(mean) - chroma[name]))
            assert nearest == obj.color
        # outside the boxes the image is background (plus noise)
        assert not foreground[~covered].any()


def by_shape(ex: world.SceneQuestion) -> dict[str, world.Obj]:
    return {o.shape: o for o in ex.objects}


def test_choose_attr_answers():
    for ex in examples("ChooseAttr"):
        obj = by_shape(ex)[ex.roles["central object"]]
        values = {obj.color, obj.material, obj.size}
        assert ex.answer in values and ex.false_option not in values
        assert ex.question == f"Is the {obj.shape} {ex.answer} or {ex.false_option}?" or ex.question == (
            f"Is the {obj.shape} {ex.false_option} or {ex.answer}?"
        )


def test_choose_cat_answers():
    for ex in examples("ChooseCat"):
        value = ex.question.split(",")[0].split()[-1]
        holders = [o.shape for o in ex.objects if value in (o.color, o.material, o.size)]
        assert holders == [ex.answer] and ex.false_option in by_shape(ex)


def test_choose_rel_answers():
    for ex in examples("ChooseRel"):
        subject, reference = by_shape(ex)[ex.roles["object2"]], by_shape(ex)[ex.roles["object1"]]
        assert subject.side != reference.side and subject.side == ex.answer
        sx, rx = ex.boxes[subject.shape][0], ex.boxes[reference.shape][0]
        assert (sx < rx) == (ex.answer == "left")


def test_compare_attr_answers():
    for ex in examples("CompareAttr"):
        a, b = by_shape(ex)[ex.roles["object1"]], by_shape(ex)[ex.roles["object2"]]
        assert [n for n in world.ATTRIBUTES if a.attribute(n) == b.attribute(n)] == [ex.answer]


def test_logical_obj_answers():
    for ex in examples("LogicalObj", 100):
        words = ex.question.rstrip("?").split()
        first, second, value = words[3][:-1], words[5][:-1], words[-1]
        assert {first, second} == {ex.roles["object1"], ex.roles["object2"]}
        exists = any(o.shape in (first, second) and value in (o.color, o.material, o.size) for o in ex.objects)
        assert ex.answer == ("yes" if exists else "no")


def test_logical_obj_boxes_only_for_present_objects():
    for i in range(40):
        ex = world.sample("LogicalObj", (98, i))
        row = world.example_row(ex, "q", "i")
        for prefix in ("object1", "object2"):
            present = row[f"{prefix} name"] in by_shape(ex)
            assert all((row[f"{prefix} {c}"] is not None) == present for c in world.BOX_COLUMNS)
        assert ex.answer == "no" or row["object1 x"] is not None or row["object2 x"] is not None


def test_query_attr_answers(dataset):
    for row in dataset.filter(lambda r: r["task"] == "QueryAttr"):
        centre = row["central object x"] + row["central object w"] / 2
        assert ("left" if centre < row["image_w"] / 2 else "right") == row["answer"]


def test_blank_image_has_no_objects():
    pixels = np.asarray(world.blank_image(3), dtype=float)
    assert np.abs(pixels - np.array(world.BACKGROUND)).max() < 6 * world.NOISE_STD


def test_processor_and_tokenizer():
    from shapes_world.train import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    ex = world.sample("ChooseAttr", (5, 5))
    text = llava15_prompt(ex.question)
    inputs = processor(text=[text], images=[ex.image], return_tensors="pt")
    tokens = tok.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens[0] == "<s>" and tokens[-2:] == ["ASSISTANT", ":"]
    assert tokens.count("<image>") == 16 and "\n" in tokens and "<unk>" not in tokens
    assert tok.convert_tokens_to_ids("Red") != tok.convert_tokens_to_ids("red")
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert getattr(processor, "chat_template", None) is None
    enc = tok(text, return_offsets_mapping=True)
    for token, (start, end) in zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]):
        if token != "<s>":
            assert text[start:end] == token


def test_checkpoint_loads_and_answers_with_a_single_word():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from shapes_world.evaluate import first_token_predictions

    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    assert model.config.text_config.num_hidden_layers >= 8
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 20 * 2**20
    ex = world.sample("QueryAttr", (5, 6))
    predictions = first_token_predictions(model, processor, [ex.question], [ex.image])
    with torch.no_grad():
        inputs = processor(text=[llava15_prompt(ex.question)], images=[ex.image], return_tensors="pt")
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    assert predictions[0] in processor.tokenizer.get_vocab()
    from shapes_world.train import build_processor

    fresh, text = build_processor().tokenizer, llava15_prompt(ex.question)
    loaded = processor.tokenizer(text, return_offsets_mapping=True)
    assert loaded["input_ids"] == fresh(text)["input_ids"]
    assert loaded["offset_mapping"] == fresh(text, return_offsets_mapping=True)["offset_mapping"]


def test_query_cat_is_choose_cat_without_options():
    from shapes_world.train import query_cat

    for ex in examples("ChooseCat", 40):
        aux = query_cat(ex)
        value = ex.question.split()[3].rstrip(",")
        assert aux.question == f"Which shape is {value}?" and aux.task == "QueryCat"
        assert aux.answer == ex.answer and aux.image is ex.image and aux.true_option is None
        holders = [o.shape for o in ex.objects if value in (o.color, o.material, o.size)]
        assert holders == [ex.answer]  # the value singles out the answer's object


def test_word_aware_init_and_answer_only_loss_weights():
    from shapes_world.train import build_model, build_processor, encode_sequence

    processor = build_processor()
    tok = processor.tokenizer
    model = build_model(tok, seed=0)
    emb = model.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids
    offsets = [emb[ids(s + "s")] - emb[ids(s)] for s in world.SHAPES]
    assert all(torch.allclose(o, offsets[0]) for o in offsets) and offsets[0].norm() > 0.1
    assert not torch.allclose(emb[ids("circle")], emb[ids("square")])
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied: the LM head is the embedding
    capitals = [emb[ids(w.capitalize())] - emb[ids(w)] for w in ("red", "left", "yes", "circle", "color", "is")]
    assert all(torch.allclose(c, capitals[0], atol=1e-6) for c in capitals) and capitals[0].norm() > 0.1
    assert not torch.allclose(capitals[0], offsets[0])
    untied = build_model(tok, seed=0, tied=False)
    head = untied.get_output_embeddings().weight
    assert torch.equal(head, untied.get_input_embeddings().weight) and head.data_ptr() != emb.data_ptr()

    ex = world.sample("ChooseAttr", (3, 3))
    ids_, weights = encode_sequence(processor, ex, None, 0.1)
    tokens = tok.convert_ids_to_tokens(ids_)
    trained = [t for t, w in zip(tokens, weights) if w > 0]
    assert trained == [ex.answer.capitalize(), "</s>"] and tokens[-3:-1] == [":", ex.answer.capitalize()]
    ids_, weights = encode_sequence(processor, ex, "the circle is red .", 0.1)
    tokens = tok.convert_ids_to_tokens(ids_)
    assert [t for t, w in zip(tokens, weights) if w == 0.1] == ["the", "circle", "is", "red", ".", "</s>"]


def _tiny_training_args(tmp_path, name: str) -> list[str]:
    return [
        "--out", str(tmp_path / name / "model"), "--state-dir", str(tmp_path / name / "state"),
        "--batch-size", "4", "--align-steps", "3", "--steps", "6", "--warmup", "2", "--eval-every", "3",
        "--save-every", "3", "--dev-n", "2", "--patience", "3", "--threads", "1",
    ]  # fmt: skip


def test_training_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    """A run that crashes after its step-3 checkpoint and is started again ends with the same weights as an
    uninterrupted run (batches, curriculum and optimizer state are all restored)."""
    from safetensors.torch import load_file

    from shapes_world import train

    train.train(train.parse_args(_tiny_training_args(tmp_path, "straight")))
    loss, calls = train.weighted_lm_loss, []

    def crash_at_step_5(model, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return loss(model, batch)

    monkeypatch.setattr(train, "weighted_lm_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args(_tiny_training_args(tmp_path, "resumed")))
    assert torch.load(tmp_path / "resumed" / "state" / "state.pt", weights_only=False)["state"]["step"] == 3
    monkeypatch.setattr(train, "weighted_lm_loss", loss)
    train.train(train.parse_args(_tiny_training_args(tmp_path, "resumed")))

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")  # the exported (best) step
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    final = [torch.load(tmp_path / n / "state" / "state.pt", weights_only=False) for n in ("straight", "resumed")]
    untimed = [{k: v for k, v in f["state"].items() if k not in ("seconds", "history")} for f in final]
    assert untimed[0] == untimed[1] and untimed[0]["step"] == 6 and untimed[0]["active"] == 3
    assert all(torch.equal(final[0]["model"][k], final[1]["model"][k]) for k in final[0]["model"])
    logs = [json.loads((tmp_path / n / "model" / "training_log.json").read_text()) for n in ("straight", "resumed")]
    assert logs[0]["steps"] == logs[1]["steps"] == 6
    assert [h["loss"] for h in logs[0]["history"]] == [h["loss"] for h in logs[1]["history"]]
    assert "out" not in logs[0]["arguments"]  # the log does not depend on where the repo lives


def test_world_shares_the_papers_vocabulary_without_importing_the_library():
    """The world's task order (which seeds every dataset) is the paper's, and world.py imports no analysis code."""
    import ast

    from mmflow.paper import OBJECT_COLUMNS, TASKS

    assert world.TASKS == TASKS
    assert set(world.ROLE_COLUMNS) == {p for prefixes in OBJECT_COLUMNS.values() for p in prefixes}
    tree = ast.parse(Path(world.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("mmflow", "mmflow_utils")}
