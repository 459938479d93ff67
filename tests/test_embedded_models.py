"""The two embedded models: shapes-llava (LLaVA-1.5) and shapes-qwen (Qwen2-VL), trained by one recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mmflow_utils as mu
from shapes_world import archs, world

#: A split seed no training or evaluation default uses (fresh questions and pictures).
FRESH_SEED = 31337


@pytest.fixture(scope="module")
def qwen():
    return mu.load_model("shapes-qwen")


def test_both_load_by_name_without_torchvision(qwen):
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()  # the environment this repository pins
    model, processor = qwen
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor" and not hasattr(processor, "video_processor")
    assert mu.num_layers(model) >= mu.num_layers(mu.load_model("shapes-llava")[0])  # at least as deep
    folder = mu.EMBEDDED_MODELS["shapes-qwen"]
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 15 * 2**20
    assert mu.Run.load("shapes-qwen").inputs == "processor"  # its processor's chat turn, which is also "paper"


def test_qwen_geometry_gives_other_grids_for_other_aspect_ratios(qwen):
    """smart_resize with min_pixels 112x112: a 64x64 picture is 4x4 merged 28-px cells (one per 16-px world cell),
    a 64x48 one 4x5 (the short side scaled to 112 px), a 640x480 one 6x9 (scaled down to within 224x224 pixels)."""
    _, processor = qwen
    grids = []
    for size in ((64, 64), (64, 48), (640, 480)):
        image = world.blank_image(0).resize(size)
        thw = processor.image_processor([image], return_tensors="pt")["image_grid_thw"][0].tolist()
        grids.append((thw[1] // 2, thw[2] // 2))
    assert grids == [(4, 4), (4, 5), (6, 9)]


def test_training_sequences_are_what_the_processor_encodes(qwen):
    """Training feeds exactly mmflow's encoding: the prompt with its image tokens and M-RoPE token types."""
    from shapes_world import train

    _, processor = qwen
    arch = archs.arch("shapes-qwen")
    examples = [world.sample(task, (9, i)) for i, task in enumerate(world.TASKS)]
    batch = train.collate(processor, examples, [None] * len(examples), 0.1, arch)
    for i, ex in enumerate(examples):
        enc = processor(text=[arch.prompt(processor, ex.question)], images=[ex.image], return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert torch.equal(batch.input_ids[i, :n], enc["input_ids"][0])
        assert torch.equal(batch.pixel_inputs["mm_token_type_ids"][i, :n], enc["mm_token_type_ids"][0])
        answer = processor.tokenizer.convert_ids_to_tokens(batch.input_ids[i, n : n + 2].tolist())
        assert answer == [ex.answer.capitalize(), "<|im_end|>"] and batch.weights[i, n].item() == 0.5
    config = mu.load_model("shapes-qwen")[0].config
    assert arch.prompt(processor, "Q?") == mu.build_prompt(processor, "Q?", "paper", config)


def test_sequences_without_the_system_turn_are_the_prompt_less_that_turn(qwen):
    """``--p-no-system``: such a sequence is the processor's encoding of the same turn with its default system turn
    cut off the front, and nothing else changes (image tokens, token types, answer)."""
    from shapes_world import train

    _, processor = qwen
    arch = archs.arch("shapes-qwen")
    assert arch.system_turn and arch.p_no_system > 0
    examples = [world.sample(task, (9, i)) for i, task in enumerate(world.TASKS)]
    batch = train.collate(processor, examples, [None] * len(examples), 0.1, arch, [False] * len(examples))
    cut = len(processor.tokenizer(arch.system_turn).input_ids)
    for i, ex in enumerate(examples):
        enc = processor(text=[arch.prompt(processor, ex.question)], images=[ex.image], return_tensors="pt")
        assert processor.tokenizer.decode(enc["input_ids"][0, :cut]).replace(" ", "") == arch.system_turn.replace(
            " ", ""
        )
        n = enc["input_ids"].shape[1] - cut
        assert torch.equal(batch.input_ids[i, :n], enc["input_ids"][0, cut:])
        assert torch.equal(batch.pixel_inputs["mm_token_type_ids"][i, :n], enc["mm_token_type_ids"][0, cut:])
        answer = processor.tokenizer.convert_ids_to_tokens(batch.input_ids[i, n : n + 2].tolist())
        assert answer == [ex.answer.capitalize(), "<|im_end|>"]
    with pytest.raises(ValueError, match="system turn"):
        train.encode_sequence(processor, examples[0], None, 0.1, archs.arch("shapes-llava"), 16, system=False)


def test_dropping_the_system_turn_draws_from_its_own_stream():
    """The option changes which sequences keep the system turn and nothing else of a batch, so a recipe without it
    (shapes-llava's) draws exactly the batches it drew before the option existed; shapes-llava refuses it."""
    from shapes_world import train

    state = train.TrainState(step=17, active=3, dev_accuracy={"ChooseAttr": 0.5})
    plain = train.training_examples(state, train.parse_args(["--model", "shapes-qwen", "--p-no-system", "0"]))
    dropped = train.training_examples(state, train.parse_args(["--model", "shapes-qwen"]))
    assert [e.question for e in plain[0]] == [e.question for e in dropped[0]] and plain[1] == dropped[1]
    assert all(plain[2]) and 0 < dropped[2].count(False) < len(dropped[2])
    assert train.parse_args(["--model", "shapes-llava"]).p_no_system == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "shapes-llava", "--p-no-system", "0.5"])
    for bad in ("1.5", "-0.1"):  # not a fraction: refused before anything is written
        with pytest.raises(SystemExit):
            train.parse_args(["--model", "shapes-qwen", "--p-no-system", bad])


@pytest.mark.parametrize("name", ["shapes-llava", "shapes-qwen"])
def test_checkpoint_is_what_make_toy_model_trains(name):
    """The shipped checkpoint's training log records the defaults of ``make toy-model MODEL=<name>``, ran to the end,
    and the exported weights are those of its best development step among those trained with grounding turns."""
    from shapes_world.train import PATH_ARGUMENTS, parse_args

    folder = mu.EMBEDDED_MODELS[name]
    log = json.loads((folder / "training_log.json").read_text())
    defaults = {k: v for k, v in vars(parse_args(["--model", name])).items() if k not in PATH_ARGUMENTS}
    if "model" not in log["arguments"]:  # shapes-llava was trained before --model existed (its only model then)
        assert name == "shapes-llava"
        defaults.pop("model")
    if "p_no_system" not in log["arguments"]:  # nor --p-no-system, which draws nothing when 0 (its default)
        assert name == "shapes-llava" and defaults.pop("p_no_system") == 0
    assert log["arguments"] == defaults and log["curriculum"] == defaults["curriculum"]
    assert log["steps"] == defaults["steps"] and log["history"][-1]["step"] == defaults["steps"]
    grounding_from = max(log["unlocked_at_step"][-1], math.ceil(defaults["describe_from"] * defaults["steps"]))
    assert len(log["unlocked_at_step"]) == len(log["curriculum"])  # every family was unlocked

    def rank(h: dict) -> tuple:  # a step's model has been trained on the batches of steps 0 .. step - 1
        return (h["step"] - 1 >= grounding_from, min(h[t] for t in world.TASKS), sum(h[t] for t in world.TASKS))

    best = max(log["history"], key=rank)
    assert best["step"] == log["exported_step"] and log["exported_step_trained_with_grounding_turns"]
    assert best["step"] > grounding_from
    arch = archs.arch(name)
    fresh = arch.build_model(arch.build_processor().tokenizer, defaults["seed"], defaults["tied_embeddings"])
    shipped, _ = mu.load_model(name)
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    tied = shipped.get_output_embeddings().weight.data_ptr() == shipped.get_input_embeddings().weight.data_ptr()
    assert tied == defaults["tied_embeddings"]
    # frozen in training: the word embeddings are still the seeded word-aware initialisation
    assert torch.equal(shipped.get_input_embeddings().weight, fresh.get_input_embeddings().weight)


@pytest.mark.parametrize("name", ["shapes-llava", "shapes-qwen"])
def test_answers_fresh_questions_from_the_image(name):
    """On a split no training or default evaluation uses: >= 0.90 per task; with blank pictures <= 0.6."""
    from shapes_world.evaluate import first_token_accuracy

    model, processor = mu.load_model(name)
    dataset = world.make_dataset(30, FRESH_SEED)
    accuracy = first_token_accuracy(model, processor, dataset)
    blank = first_token_accuracy(model, processor, dataset, blank=True)
    assert min(accuracy.values()) >= 0.90, accuracy
    assert sum(blank.values()) / len(blank) <= 0.6, blank
