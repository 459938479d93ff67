"""Train shapes-llava, a tiny LLaVA-1.5 stand-in, from scratch on the shapes world (CPU, one thread).

Run ``python -m shapes_world.train``. The run is deterministic by ``--seed`` and resumable: it writes its full state
to ``shapes_world/train_state/`` every ``--save-every`` steps and continues from there when restarted. Whenever the
held-out development accuracy improves (ranked by :func:`export_score`), the model and processor are exported with
``save_pretrained`` to ``shapes_world/shapes-llava/`` together with ``training_log.json``.

Model: a real ``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower (hidden 128, 16-px patches on 64x64
images, so 4x4 = 16 image tokens), LLaVA's 2-layer GELU projector, and an 8-layer Llama (hidden 128, 4 heads,
MLP 512, untied embeddings, ``initializer_range = 1/sqrt(128)``). Processor: ``LlavaProcessor`` with a
``CLIPImageProcessorPil`` and a word-level tokenizer (``<s>``/``</s>``, ``<image>`` added special token, ``\\n`` a
token, Capitalized answer words distinct from lowercase ones), no chat template.

Training has two stages, mirroring LLaVA's recipe at toy scale:

1. **Alignment** (stand-in for CLIP pretraining + LLaVA stage 1): the vision tower and projector are trained to map
   every patch onto the sum of the LM's (initial) word embeddings of what the patch shows: for an object cell
   ``E[shape] + E[color] + E[material] + E[size] + E[left|right]``, for a background cell ``E[background]`` (MSE plus
   a cross-entropy that classifies each attribute by the nearest word embedding, since background cells dominate
   the MSE). Image tokens therefore start out "word-like", which is what makes question-to-image lookups learnable.
2. **Instruction tuning**: tower, projector and the (tied) word embeddings are frozen, so image tokens stay the
   aligned sums of word embeddings; the LM layers and final norm are trained on single-turn VQA in the exact
   evaluation prompt, ``USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:``
   with target `` {Answer}</s>`` (Capitalized, as LLaVA-1.5 answers). A per-family **curriculum with replay** adds
   the families one at a time (``--curriculum``): a family is unlocked when all active families reach
   ``--unlock-acc`` on a development split or after ``--patience`` steps, and active families are sampled with
   weight ``--replay + (1 - accuracy)``, so learnt families keep being replayed. The families that look an object
   up by its shape word (ChooseAttr, QueryAttr, ChooseRel, CompareAttr) come first and click within a few hundred
   steps each. Then a training-only family, **QueryCat** ("Which shape is red?", a ChooseCat question without its
   options), forms the attribute-value -> image-token lookup that ChooseCat and LogicalObj need; with its options,
   ChooseCat offers a 50 % shortcut (name either option) on which training stalled for thousands of steps.

Initialisation choices that stand in for what a pretrained LM brings along (:func:`word_aware_init`): a plural's
embedding is its singular's plus a shared vector, the LM head is tied to the input embeddings, and a Capitalized
word's embedding is its lowercase word's plus a shared "capital" vector, so ``Red`` and ``red`` differ by one
direction that the model has to write when it answers.

**Grounding sentences (deliberate design choice).** With an answer-only loss the lowercase answer words (``red``,
``left``, ``yes``, ``color``...) are never outputs, so their probability is ~0 at every layer and the paper's
"lowercase answer first, Capitalized answer last" logit-lens analysis has nothing to show. Therefore, in a fraction
``--p-describe`` of the batches, every answer is followed by a second turn
``USER: Describe the image. ASSISTANT: ...`` whose reply consists of lowercase grounding sentences with LM loss,
e.g. ``the circle is red metal small on the left .``, ``the circle and the square share the color .``,
``are there red circles ? yes .``, ``the red shape is the circle .`` and
``are there either circles or squares that are red ? no .``. Every lowercase answer word of the six families is
thus an output in some context, while the evaluated first turn never sees this text. The grounding turns join
once every family is unlocked and ``--describe-from`` of the steps are done: from the start they held back the
attribute-keyed lookup (QueryCat stayed at chance for 400 steps with them and clicked at about step 900 without).

**The system turn (shapes-qwen).** Qwen2-VL's chat template opens every prompt with the default system turn
(``<|im_start|>system\nYou are a helpful assistant.<|im_end|>``), and the evaluated prompt keeps it. Trained only on
such prompts, shapes-qwen learnt the look-ups slowly (ChooseAttr at 0.7-0.86 for 5,000 steps; ChooseCat and
LogicalObj never left their two-way prior in 7,000); with that turn left out of every prompt, ChooseAttr reached
0.99 at step 500, as shapes-llava does. So its recipe leaves the system turn out of a fraction ``--p-no-system``
(0.5) of the training sequences, drawn per sequence from a stream of its own; development, export and every
evaluation use the full prompt. shapes-llava's prompt has no system turn (0, and its batches are unchanged).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from shapes_world import archs, world
from shapes_world.archs import Arch
from shapes_world.evaluate import first_token_accuracy

PACKAGE_DIR = Path(__file__).parent
STATE_DIR = PACKAGE_DIR / "train_state"  # default of --state-dir

QUERY_CAT = "QueryCat"  # the training-only family (see :func:`query_cat`)
FAMILIES = (*world.TASKS, QUERY_CAT)
# Families in curriculum order: lookups by shape word first, then the training-only lookup by attribute value, the
# same lookup among options and the two-object yes/no question.
CURRICULUM = ("ChooseAttr", "QueryAttr", "ChooseRel", "CompareAttr", QUERY_CAT, "ChooseCat", "LogicalObj")
PATH_ARGUMENTS = ("out", "state_dir")  # arguments left out of training_log.json, which must not depend on paths
DEV_SEED = 4242  # development split for the curriculum and checkpoint selection; disjoint from world.EVAL_SEED

HIDDEN = 128
DESCRIBE_TURN = "USER: Describe the image. ASSISTANT:"

# --------------------------------------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    """All words of the prompts, questions, answers and grounding sentences (plus Capitalized answer words)."""
    words = set(
        [
            "user",
            "assistant",
            "answer",
            "the",
            "question",
            "using",
            "a",
            "single",
            "word",
            "or",
            "phrase",
            "describe",
            "image",
            "is",
            "which",
            "shape",
            "to",
            "of",
            "what",
            "do",
            "and",
            "have",
            "in",
            "common",
            "are",
            "there",
            "either",
            "that",
            "part",
            "on",
            "share",
            "background",
        ]
    )
    words |= {"USER", "ASSISTANT", "Answer", "Describe", "Is", "Which", "What", "Are", "In"}
    answers = set(world.SHAPES) | set(world.COLORS) | set(world.MATERIALS) | set(world.SIZES) | set(world.SIDES)
    answers |= set(world.ATTRIBUTES) | {"yes", "no"}
    words |= answers | {a.capitalize() for a in answers} | {s + "s" for s in world.SHAPES}
    return sorted(words) + ["?", ",", ".", ":", "\n"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace-separated words and isolated punctuation, ``\\n`` kept, ``<s>`` prepended."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("[ ]+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), "isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor() -> LlavaProcessor:
    """LlavaProcessor whose ``<image>`` expansion (16 tokens) matches the model's feature count."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": world.IMAGE_SIZE},
        crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=world.CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, tied: bool = True) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA (seeded); the LM head is tied to the input embeddings unless ``tied=False``."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=1 / math.sqrt(HIDDEN),
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=world.IMAGE_SIZE,
        patch_size=world.CELL,
        projection_dim=HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    word_aware_init(model, tokenizer)
    return model


def word_aware_init(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast) -> None:
    """Initialisation choices a pretrained LM would bring along (in place, seeded by the caller).

    * A plural's embedding is its singular's plus a shared "plural" vector (``circles`` = ``circle`` + s), as a
      subword tokenizer would give, so "Are there either circles ..." can find the image tokens of circles.
    * With tied embeddings (the default), a Capitalized word's embedding is its lowercase word's plus a shared
      "capital" vector (``Red`` = ``red`` + C), so the output ``Red`` differs from ``red`` by one direction: a
      residual stream that carries the answer's meaning scores both forms, and the case is a separate decision.
    * Untied, the LM head starts as a copy of the input embeddings.
    """
    embeddings = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        plural = torch.randn(embeddings.shape[1]) * embeddings.std()
        for shape in world.SHAPES:
            embeddings[vocab[shape + "s"]] = embeddings[vocab[shape]] + plural
        if model.config.tie_word_embeddings:
            capital = torch.randn(embeddings.shape[1]) * embeddings.std()
            for word, i in vocab.items():
                if word != word.lower() and word.lower() in vocab:
                    embeddings[i] = embeddings[vocab[word.lower()]] + capital
        else:
            model.get_output_embeddings().weight.copy_(embeddings)


# ------------------------------------------------------------------------------------ grounding sentences


def describe(example: world.SceneQuestion, rng: np.random.Generator) -> str:
    """Lowercase grounding sentences about the example's scene (objects in random order), including sentences that
    look objects up by an attribute value (``the red shape is the circle .``,
    ``are there either circles or squares that are red ? no .``)."""
    objects = list(example.objects)
    sentences = []
    for k in rng.permutation(len(objects)):
        o = objects[int(k)]
        sentences.append(f"the {o.shape} is {o.color} {o.material} {o.size} on the {o.side} .")
    a, b = (objects[int(k)] for k in rng.permutation(len(objects))[:2])
    shared = [name for name in world.ATTRIBUTES if a.attribute(name) == b.attribute(name)]
    if len(shared) == 1:
        sentences.append(f"the {a.shape} and the {b.shape} share the {shared[0]} .")
    probe = objects[int(rng.integers(len(objects)))]
    shape = probe.shape if rng.random() < 0.5 else str(rng.choice(world.SHAPES))
    attribute = str(rng.choice(list(world.ATTRIBUTES)))
    value = probe.attribute(attribute)
    exists = any(o.shape == shape and o.attribute(attribute) == value for o in objects)
    sentences.append(f"are there {value} {shape}s ? {'yes' if exists else 'no'} .")
    sentences += attribute_keyed_sentences(objects, rng)
    return " ".join(sentences)


def attribute_keyed_sentences(objects: list[world.Obj], rng: np.random.Generator) -> list[str]:
    """Sentences naming the shape of every object singled out by an attribute value, plus one either/or query."""
    sentences = []
    attribute = str(rng.choice(list(world.ATTRIBUTES)))
    for k in rng.permutation(len(objects)):
        value = objects[int(k)].attribute(attribute)
        if sum(o.attribute(attribute) == value for o in objects) == 1:
            sentences.append(f"the {value} shape is the {objects[int(k)].shape} .")
    first, second = (str(s) for s in rng.permutation(world.SHAPES)[:2])
    value = objects[int(rng.integers(len(objects)))].attribute(str(rng.choice(list(world.ATTRIBUTES))))
    exists = any(o.shape in (first, second) and value in (o.color, o.material, o.size) for o in objects)
    sentences.append(f"are there either {first}s or {second}s that are {value} ? {'yes' if exists else 'no'} .")
    return sentences


# ------------------------------------------------------------------------------------ auxiliary family


def query_cat(example: world.SceneQuestion) -> world.SceneQuestion:
    """The training-only family QueryCat: a ChooseCat question without its options ("Which shape is red?").

    Looking an object up by an attribute value and reading its shape is the same circuit ChooseCat needs, but without
    options there is no 50 % shortcut ("name one of the two shapes"). Trained alone from scratch it clicked at about
    step 900; ChooseCat trained with its options stayed at chance for 3,000 steps (see the README).
    """
    return replace(
        example, task=QUERY_CAT, question=query_cat_question(example.question), true_option=None, false_option=None
    )


def query_cat_question(choose_cat_question: str) -> str:
    """``Which shape is red, the circle or the square?`` -> ``Which shape is red?``."""
    return choose_cat_question.split(",")[0] + "?"


def sample_task(task: str, key: tuple[int, ...]) -> world.SceneQuestion:
    """One training example of a shapes-world family or of the auxiliary QueryCat."""
    return query_cat(world.sample("ChooseCat", key)) if task == QUERY_CAT else world.sample(task, key)


def development_split(n: int) -> datasets.Dataset:
    """``n`` development questions per family (six families + QueryCat, from the ChooseCat images)."""
    dev = world.make_dataset(n, seed=DEV_SEED)
    cat = dev.filter(lambda row: row["task"] == "ChooseCat")
    cat = cat.map(lambda row: {"task": QUERY_CAT, "question": query_cat_question(row["question"])})
    return datasets.concatenate_datasets([dev, cat])


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """Model inputs plus per-token loss weights (0 on prompt tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_inputs: dict[str, torch.Tensor]  # what the image processor returns, plus mm_token_type_ids where needed
    weights: torch.Tensor


def image_token_count(processor: LlavaProcessor) -> int:
    """Number of ``<image>`` tokens the processor expands one image into."""
    return (world.IMAGE_SIZE // processor.patch_size) ** 2 + processor.num_additional_image_tokens - 1


def encode_sequence(
    processor,
    example: world.SceneQuestion,
    description: str | None,
    desc_weight: float,
    arch: Arch | None = None,
    n_image_tokens: int | None = None,
    system: bool = True,
):
    """Token ids and loss weights of one training sequence: the model's evaluated prompt (``arch.prompt``) with its
    image placeholder expanded as the processor does, the Capitalized answer and its end of turn, and optionally the
    grounding turn. By default shapes-llava's (:mod:`shapes_world.archs`) with its fixed image token count.
    ``system=False`` leaves out the prompt's default system turn (``arch.system_turn``; see ``--p-no-system``)."""
    arch = arch or archs.arch("shapes-llava")
    n_image_tokens = n_image_tokens or image_token_count(processor)
    tok = processor.tokenizer
    text = arch.prompt(processor, example.question)
    if not system:
        if not arch.system_turn or not text.startswith(arch.system_turn):
            raise ValueError(f"{arch.name}'s prompt does not start with its system turn {arch.system_turn!r}")
        text = text[len(arch.system_turn) :]
    text = text.replace(arch.image_token, arch.image_token * n_image_tokens)
    ids = tok(text).input_ids
    weights = [0.0] * len(ids)
    answer = tok(f"{arch.answer_prefix}{example.answer.capitalize()}{arch.end_of_turn}", add_special_tokens=False)
    answer = answer.input_ids
    ids += answer
    weights += [1.0 / len(answer)] * len(answer)
    if description is not None:
        turn = tok(arch.describe_turn, add_special_tokens=False).input_ids
        reply = tok(f"{arch.answer_prefix}{description}{arch.end_of_turn}", add_special_tokens=False).input_ids
        ids += turn + reply
        weights += [0.0] * len(turn) + [desc_weight] * len(reply)
    return ids, weights


def pixel_inputs(processor, images: list) -> dict[str, torch.Tensor]:
    """What the image processor gives for ``images`` (pixel values, and Qwen2-VL's ``image_grid_thw``)."""
    return dict(processor.image_processor(images, return_tensors="pt"))


def image_token_counts(processor, pixels: dict[str, torch.Tensor]) -> list[int]:
    """Number of image tokens of each image: from its ``image_grid_thw`` over the merge (Qwen2-VL) or the fixed
    count of a LLaVA processor."""
    if "image_grid_thw" in pixels:
        merge = processor.image_processor.merge_size
        return [int(thw.prod()) // merge**2 for thw in pixels["image_grid_thw"]]
    return [image_token_count(processor)] * len(pixels["pixel_values"])


def collate(
    processor,
    examples: list[world.SceneQuestion],
    descriptions: list,
    desc_weight: float,
    arch: Arch,
    systems: list[bool] | None = None,
) -> Batch:
    """Right-padded batch of training sequences (``systems``: per sequence, whether it keeps the system turn)."""
    pixels = pixel_inputs(processor, [ex.image for ex in examples])
    counts = image_token_counts(processor, pixels)
    systems = systems or [True] * len(examples)
    encoded = [
        encode_sequence(processor, ex, d, desc_weight, arch, n, system)
        for ex, d, n, system in zip(examples, descriptions, counts, systems)
    ]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    weights = torch.zeros((len(encoded), length))
    for i, (ids, w) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        weights[i, : len(w)] = torch.tensor(w)
    if arch.mm_token_type_ids:
        pixels["mm_token_type_ids"] = (input_ids == processor.tokenizer.convert_tokens_to_ids(arch.image_token)).long()
    return Batch(input_ids, attention, pixels, weights)


def weighted_lm_loss(model, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy weighted per target token, averaged over sequences."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.pixel_inputs).logits
    targets = batch.input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (nll * batch.weights[:, 1:]).sum() / batch.input_ids.shape[0]


# ------------------------------------------------------------------------------------- stage 1: alignment


ALIGN_GROUPS = (world.SHAPES + ("background",), tuple(world.COLORS), world.MATERIALS, world.SIZES, world.SIDES)


def patch_targets(model: LlavaForConditionalGeneration, tokenizer, scene: tuple[world.Obj, ...]) -> torch.Tensor:
    """[16, hidden] target image tokens: sums of the word embeddings of each cell's contents."""
    emb = model.get_input_embeddings().weight.detach()

    def e(word: str) -> torch.Tensor:
        return emb[tokenizer.convert_tokens_to_ids(word)]

    targets = e("background").repeat(world.GRID * world.GRID, 1)
    for o in scene:
        targets[o.cell[1] * world.GRID + o.cell[0]] = e(o.shape) + e(o.color) + e(o.material) + e(o.size) + e(o.side)
    return targets


def patch_labels(scene: tuple[world.Obj, ...]) -> torch.Tensor:
    """[16, 5] index of each cell's word within every ALIGN_GROUPS group (-100 = none, for background cells)."""
    labels = torch.full((world.GRID * world.GRID, len(ALIGN_GROUPS)), -100, dtype=torch.long)
    labels[:, 0] = ALIGN_GROUPS[0].index("background")
    for o in scene:
        words = (o.shape, o.color, o.material, o.size, o.side)
        labels[o.cell[1] * world.GRID + o.cell[0]] = torch.tensor([g.index(w) for g, w in zip(ALIGN_GROUPS, words)])
    return labels


def image_tokens(model, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Projected image tokens [B, 16, hidden], exactly as the LM receives them (in the processor's token order:
    row-major cells for both architectures)."""
    features = model.model.get_image_features(**pixels)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def word_logits(model, tokenizer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Dot products of image tokens with the word embeddings of every ALIGN_GROUPS group."""
    emb = model.get_input_embeddings().weight.detach()
    return [tokens @ emb[tokenizer.convert_tokens_to_ids(list(group))].T for group in ALIGN_GROUPS]


def align_accuracy(model, tokenizer, processor, seed: int, n: int = 64) -> dict[str, float]:
    """Per group (shape, colour, material, size, side): fraction of object cells whose word is recovered from the
    projected image token as the nearest word embedding within the group."""
    scenes = [world.random_scene(np.random.default_rng([seed, i])) for i in range(n)]
    images = [world.render(s, np.random.default_rng([seed, i, 1]))[0] for i, s in enumerate(scenes)]
    with torch.no_grad():
        tokens = image_tokens(model, pixel_inputs(processor, images))
    labels = torch.stack([patch_labels(s) for s in scenes])
    objects = labels[:, :, 1] >= 0
    names = ("shape", "color", "material", "size", "side")
    return {
        name: round((logits.argmax(-1) == labels[:, :, k])[objects].float().mean().item(), 3)
        for k, (name, logits) in enumerate(zip(names, word_logits(model, tokenizer, tokens)))
    }


def alignment_loss(model, tokenizer, tokens: torch.Tensor, scenes: list) -> torch.Tensor:
    """Nearest-word cross-entropy per group (logit scale 4) plus 10 x MSE to the embedding-sum targets."""
    labels = torch.stack([patch_labels(s) for s in scenes])
    ce = sum(
        F.cross_entropy(4 * logits.flatten(0, 1), labels[:, :, k].flatten())
        for k, logits in enumerate(word_logits(model, tokenizer, tokens))
    )
    targets = torch.stack([patch_targets(model, tokenizer, s) for s in scenes])
    return ce + 10 * F.mse_loss(tokens, targets)


def train_alignment(model, processor, args, state: TrainState, arch: Arch) -> None:
    """Stage 1: fit vision tower + projector so that image tokens match their words' embeddings."""
    tokenizer = processor.tokenizer
    params = [p for module in arch.vision(model) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.align_lr, weight_decay=0.0)
    bar = tqdm(
        range(state.align_step, args.align_steps), desc="align", initial=state.align_step, total=args.align_steps
    )
    for step in bar:
        rng = np.random.default_rng([world.TRAIN_NAMESPACE, args.seed, 0, step])
        scenes = [world.random_scene(rng) for _ in range(args.batch_size)]
        images = [world.render(s, rng)[0] for s in scenes]
        loss = alignment_loss(model, tokenizer, image_tokens(model, pixel_inputs(processor, images)), scenes)
        for group in optimizer.param_groups:
            group["lr"] = args.align_lr * min(1.0, (step + 1) / args.warmup)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        state.align_step = step + 1
    state.align_accuracy = align_accuracy(model, tokenizer, processor, seed=DEV_SEED)
    tqdm.write(f"alignment done: nearest-word accuracy {state.align_accuracy}")


# ---------------------------------------------------------------------------------- stage 2: curriculum


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    align_step: int = 0
    align_accuracy: dict[str, float] = field(default_factory=dict)
    step: int = 0
    active: int = 1  # number of CURRICULUM families currently trained
    unlocked_at: list[int] = field(default_factory=lambda: [0])
    dev_accuracy: dict[str, float] = field(default_factory=dict)
    best_score: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0])  # see export_score
    best_step: int = -1
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def task_weights(state: TrainState, curriculum: list[str], replay: float) -> dict[str, float]:
    """Sampling weights of the active families: ``replay`` plus what each family still lacks of perfect accuracy."""
    return {t: replay + (1.0 - state.dev_accuracy.get(t, 0.0)) for t in curriculum[: state.active]}


def grounding_turns_on(state: TrainState, args, step: int) -> bool:
    """Whether the batch of ``step`` may carry grounding turns: every family unlocked and ``--describe-from`` reached
    (see the module docstring)."""
    return state.active == len(args.curriculum) and step >= args.describe_from * args.steps


def export_score(state: TrainState, args) -> list[float]:
    """How a development evaluation ranks for export, compared as a list: first whether the model has been trained
    with grounding turns (the answer-casing analysis needs the lowercase answer words it learns from them), then the
    worst of the six families, then their mean."""
    values = [state.dev_accuracy[t] for t in world.TASKS]
    grounded = grounding_turns_on(state, args, state.step - 1)  # the batch just trained on
    return [float(grounded), min(values), sum(values) / len(values)]


def training_examples(state: TrainState, args) -> tuple[list[world.SceneQuestion], list[str | None], list[bool]]:
    """The batch of step ``state.step`` (a deterministic function of seed, step and curriculum state): examples, their
    grounding turns (or None) and whether each keeps the system turn (drawn from a stream of its own, so that a
    recipe without ``--p-no-system`` draws exactly the batches it drew before the option existed)."""
    rng = np.random.default_rng([world.TRAIN_NAMESPACE, args.seed, 1, state.step])
    weights = task_weights(state, args.curriculum, args.replay)
    names, p = list(weights), np.array(list(weights.values()))
    tasks = rng.choice(names, size=args.batch_size, p=p / p.sum())
    # per batch, so that short batches stay short
    with_description = rng.random() < args.p_describe and grounding_turns_on(state, args, state.step)
    examples, descriptions = [], []
    for i, task in enumerate(tasks):
        ex = sample_task(str(task), (world.TRAIN_NAMESPACE, args.seed, 2, state.step, i))
        examples.append(ex)
        descriptions.append(describe(ex, rng) if with_description else None)
    systems = [True] * len(examples)
    if args.p_no_system > 0:
        draws = np.random.default_rng([world.TRAIN_NAMESPACE, args.seed, 3, state.step]).random(len(examples))
        systems = [bool(u >= args.p_no_system) for u in draws]
    return examples, descriptions, systems


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def update_curriculum(state: TrainState, args) -> None:
    """Unlock the next family once all active ones are learnt or the newest has had ``--patience`` steps."""
    curriculum = args.curriculum
    if state.active >= len(curriculum):
        return
    learnt = all(state.dev_accuracy.get(t, 0.0) >= args.unlock_acc for t in curriculum[: state.active])
    if learnt or state.step - state.unlocked_at[-1] >= args.patience:
        state.active += 1
        state.unlocked_at.append(state.step)
        tqdm.write(f"step {state.step}: unlocked {curriculum[state.active - 1]}")


def evaluate_dev(model, processor, dev) -> dict[str, float]:
    """Per-family first-answer-token accuracy on the development split."""
    model.eval()
    accuracy = first_token_accuracy(model, processor, dev)
    model.train()
    return accuracy


# --------------------------------------------------------------------------------------------- persistence


def save_state(state_dir: Path, model, optimizer, state: TrainState) -> None:
    """Atomically write the resumable training state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "state.pt.tmp"
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else None,
        "state": asdict(state),
    }
    torch.save(payload, tmp)
    os.replace(tmp, state_dir / "state.pt")


def load_state(state_dir: Path, model) -> tuple[TrainState, dict | None]:
    """Restore model weights and return the saved state and optimizer state (fresh state if none)."""
    path = state_dir / "state.pt"
    if not path.exists():
        return TrainState(), None
    payload = torch.load(path, weights_only=False)
    model.load_state_dict(payload["model"])
    tqdm.write(f"resumed from {path} (step {payload['state']['step']})")
    return TrainState(**payload["state"]), payload["optimizer"]


def export(model, processor, state: TrainState, args, arch: Arch) -> None:
    """Write model + processor + training_log.json to ``args.out`` (via a temporary folder)."""
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    arch.save_processor(processor, tmp)
    log = {
        "command": f"python -m shapes_world.train --model {arch.name}",
        "arguments": {k: v for k, v in vars(args).items() if k not in PATH_ARGUMENTS},
        "wall_clock_seconds": round(state.seconds, 1),
        "alignment_steps": state.align_step,
        "alignment_nearest_word_accuracy": state.align_accuracy,
        "steps": state.step,
        "exported_step": state.best_step,
        "curriculum": args.curriculum,
        "unlocked_at_step": state.unlocked_at,
        "dev_accuracy": state.dev_accuracy,
        "exported_step_trained_with_grounding_turns": bool(state.best_score[0]),
        "dev_min_and_mean_accuracy_of_exported_step": state.best_score[1:],
        "history": state.history,
    }
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def train(args) -> None:
    """Run (or resume) both stages and export the best model."""
    torch.set_num_threads(args.threads)
    arch = archs.arch(args.model)
    processor = arch.build_processor()
    model = arch.build_model(processor.tokenizer, args.seed, args.tied_embeddings)
    model.train()
    state_dir = Path(args.state_dir)
    state, optimizer_state = load_state(state_dir, model)
    started = time.time() - state.seconds
    if state.align_step < args.align_steps:
        train_alignment(model, processor, args, state, arch)
        state.seconds = time.time() - started
        save_state(state_dir, model, None, state)
        optimizer_state = None
    frozen = [*arch.vision(model), model.get_input_embeddings()]
    for p in (p for module in frozen for p in module.parameters()):
        p.requires_grad_(False)  # image tokens stay the aligned sums of (frozen) word embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    dev = development_split(args.dev_n)
    bar = tqdm(total=args.steps, initial=state.step, desc="train")
    while state.step < args.steps:
        examples, descriptions, systems = training_examples(state, args)
        batch = collate(processor, examples, descriptions, args.desc_weight, arch, systems)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state.step, args)
        loss = weighted_lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state.step += 1
        state.seconds = time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", active=state.active)
        if state.step % args.eval_every == 0 or state.step == args.steps:
            state.dev_accuracy = evaluate_dev(model, processor, dev)
            score = export_score(state, args)
            state.history.append(
                {
                    "step": state.step,
                    "seconds": round(state.seconds),
                    "loss": round(loss.item(), 4),
                    **state.dev_accuracy,
                }
            )
            tqdm.write(
                f"step {state.step} ({state.seconds / 60:.1f} min) dev "
                + " ".join(f"{t}={a:.2f}" for t, a in state.dev_accuracy.items())
            )
            if score > state.best_score:
                state.best_score, state.best_step = score, state.step
                export(model, processor, state, args, arch)
                torch.save(model.state_dict(), state_dir / "best.pt")
            update_curriculum(state, args)
        if state.step % args.save_every == 0:
            save_state(state_dir, model, optimizer, state)
    save_state(state_dir, model, optimizer, state)
    model.load_state_dict(torch.load(state_dir / "best.pt"))
    export(model, processor, state, args, arch)
    tqdm.write(
        f"done: exported step {state.best_step} (dev min/mean accuracy "
        f"{state.best_score[1]:.3f}/{state.best_score[2]:.3f}) to {args.out}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="shapes-llava", choices=sorted(archs.ARCHS), help="the embedded model to train"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder of the exported model (replaced; default shapes_world/<model>)")
    parser.add_argument(
        "--state-dir", help="resumable training state (default shapes_world/train_state, /<model> but for shapes-llava)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 on a shared machine)")
    parser.add_argument(
        "--tied-embeddings", action=argparse.BooleanOptionalAction, default=True, help="LM head = input embeddings"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--align-steps", type=int, default=1000)
    parser.add_argument("--align-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, help="instruction-tuning steps (default: the model's recipe)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--p-describe", type=float, default=0.5, help="fraction of batches with grounding turns")
    parser.add_argument(
        "--describe-from", type=float, default=0.75, help="fraction of --steps after which grounding turns join"
    )
    parser.add_argument("--desc-weight", type=float, default=0.1, help="loss weight of each grounding-turn token")
    parser.add_argument("--unlock-acc", type=float, default=0.9)
    parser.add_argument("--patience", type=int, default=1000)
    parser.add_argument(
        "--curriculum", type=lambda s: s.split(","), default=list(CURRICULUM), help="comma-separated family order"
    )
    parser.add_argument("--replay", type=float, default=0.3, help="sampling weight of a learnt family")
    parser.add_argument(
        "--p-no-system",
        type=float,
        help="fraction of training sequences without the prompt's default system turn (default: the model's recipe)",
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--dev-n", type=int, default=100, help="development questions per family")
    args = parser.parse_args(argv)
    args.out = args.out or str(PACKAGE_DIR / args.model)
    args.steps = args.steps or archs.arch(args.model).steps
    if args.p_no_system is None:
        args.p_no_system = archs.arch(args.model).p_no_system
    if not 0 <= args.p_no_system <= 1:
        parser.error(f"--p-no-system must be a fraction in [0, 1], got {args.p_no_system}")
    if args.p_no_system > 0 and not archs.arch(args.model).system_turn:
        parser.error(f"--p-no-system: {args.model}'s prompt has no system turn")
    args.state_dir = args.state_dir or str(STATE_DIR if args.model == "shapes-llava" else STATE_DIR / args.model)
    unknown = [t for t in args.curriculum if t not in FAMILIES]
    if unknown:
        parser.error(f"--curriculum: unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    return args


if __name__ == "__main__":
    train(parse_args())
