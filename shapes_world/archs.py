"""The embedded models' architectures: what :mod:`shapes_world.train` needs to know of each, one :class:`Arch` per
embedded model (``shapes-llava``: LLaVA-1.5; ``shapes-qwen``: Qwen2-VL).

Both are real transformers models built from config at toy size and trained by the same recipe; what differs is
only what the architecture itself prescribes: the processor (image preprocessing, tokenizer specials, chat
template), the prompt the model is evaluated and trained on (each family's own), the answer's end-of-turn token,
where the vision tower and projector live, and which extra text inputs the model needs (Qwen2-VL's
``mm_token_type_ids`` for its M-RoPE positions).

``shapes-qwen`` (:func:`build_qwen_model`): a ``Qwen2VLForConditionalGeneration`` with Qwen2-VL's vision tower
(14-px patches, 2-frame temporal patches, 2-D rotary attention, a 2x2 patch merger; 2 blocks, width 128) and an
8-layer Qwen2 LM (hidden 128, 4 query / 2 key-value heads, q/k/v biases, M-RoPE with sections 4/6/6 of its 16
frequency pairs, tied embeddings). Its image processor is Qwen2-VL's ``smart_resize`` with ``min_pixels`` =
112x112 and ``max_pixels`` = 224x224: a 64x64 shapes-world picture becomes 112x112, i.e. 4x4 merged 28-px cells,
one per 16-px world cell (16 image tokens, as shapes-llava has); other aspect ratios get other grids (a 64x48
picture: 4x5 cells; a 640x480 GQA picture: 6x9 = 54 cells, within the 64-cell bound).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmflow.paper import INSTRUCTION, QWEN_VL_SYSTEM
from mmflow.replicas.qwen import SPECIAL

#: Qwen2-VL's special tokens (those of the released tokenizer that the single-image turn uses, plus video's), as the
#: Qwen2-VL replicas carry them, then ``<unk>`` for the word-level vocabulary.
QWEN_SPECIALS = (*SPECIAL, "<unk>")
QWEN_PATCH, QWEN_MERGE = 14, 2
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 112 * 112, 224 * 224
#: Words of the Qwen turn besides the shapes world's (system prompt and role names).
QWEN_WORDS = ("system", "You", "helpful", "assistant", "user", "Describe", "the", "image", "a", "are")


@dataclass(frozen=True)
class Arch:
    """How :mod:`shapes_world.train` builds, prompts and feeds one embedded model."""

    name: str  #: the embedded model's name (``mmflow.checkpoints.EMBEDDED_MODELS``)
    build_processor: Callable[[], Any]
    build_model: Callable[[Any, int, bool], Any]  #: (tokenizer, seed, tied) -> a freshly initialised model
    prompt: Callable[[Any, str], str]  #: (processor, question) -> the evaluated prompt, one image placeholder
    image_token: str  #: the placeholder the processor expands into one token per image feature
    end_of_turn: str  #: what ends an answer
    answer_prefix: str  #: what precedes the answer word after the prompt (LLaVA: a space; Qwen: nothing)
    #: the second turn that asks for the grounding sentences, after the answer's end of turn
    describe_turn: str
    vision: Callable[[Any], list[torch.nn.Module]]  #: the vision tower and projector (frozen after alignment)
    #: (processor, folder): write the processor's files as the family's released checkpoints have them
    save_processor: Callable[[Any, Path], None]
    mm_token_type_ids: bool = False  #: the model wants ``mm_token_type_ids`` (1 on image tokens)
    #: instruction-tuning steps of its recipe (shapes-qwen: fewer, so that it trains within 2 h on this machine)
    steps: int = 12000
    #: the default system turn its prompt carries ("" for none), and the fraction of training sequences that leave it
    #: out (see :mod:`shapes_world.train`, ``--p-no-system``)
    system_turn: str = ""
    p_no_system: float = 0.0


# ------------------------------------------------------------------------------------------------ shapes-qwen


def qwen_tokenizer(vocabulary: list[str]):
    """Word-level tokenizer over ``vocabulary`` plus the Qwen-VL specials (no BOS: Qwen2 prepends nothing)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted((set(vocabulary) | set(QWEN_WORDS)) - {"\n"}) + (["\n"] if "\n" in vocabulary else [])
    words = [w for w in words if w not in QWEN_SPECIALS]
    vocab = {tok: i for i, tok in enumerate(list(QWEN_SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(list(QWEN_SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("[ ]+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), "isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def qwen_chat_template() -> str:
    """The released Qwen2-VL chat template (the same text the Qwen2-VL replicas carry)."""
    from mmflow.replicas.qwen import QWEN_VL_CHAT_TEMPLATE

    return QWEN_VL_CHAT_TEMPLATE


def save_qwen_processor_files(folder: Path, tokenizer) -> None:
    """Write the processor's files as a released Qwen2-VL folder has them: tokenizer files, preprocessor_config.json
    naming ``Qwen2VLImageProcessor`` / ``Qwen2VLProcessor``, chat_template.json."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    image_processor.save_pretrained(folder)
    path = Path(folder) / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": qwen_chat_template()}) + "\n")


def build_qwen_processor():
    """The shapes-qwen processor, built exactly as mmflow loads it (image-only where torchvision is missing)."""
    from transformers import Qwen2VLConfig

    from mmflow.families import build_processor
    from shapes_world.train import vocabulary

    tokenizer = qwen_tokenizer(vocabulary())
    with tempfile.TemporaryDirectory() as folder:
        save_qwen_processor_files(Path(folder), tokenizer)
        return build_processor(folder, Qwen2VLConfig(), {"local_files_only": True})


def build_qwen_model(tokenizer, seed: int, tied: bool = True, layers: int = 8, kv_heads: int = 2):
    """A freshly initialised shapes-qwen (seeded; see the module docstring)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from shapes_world.train import HIDDEN, word_aware_init

    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=1 / math.sqrt(HIDDEN),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        embed_dim=HIDDEN,
        hidden_size=HIDDEN,
        mlp_ratio=4,
        num_heads=4,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    word_aware_init(model, tokenizer)
    return model


def chat_prompt(processor, question: str) -> str:
    """The processor's chat-template turn for ``question`` (what mmflow's ``inputs="processor"`` builds; for Qwen2-VL
    also its ``"paper"`` prompt: the default system prompt, the image, the question and the instruction)."""
    from mmflow.inputs import build_prompt

    return build_prompt(processor, question, inputs="processor")


def llava_prompt(processor, question: str) -> str:
    """shapes-llava's prompt: the LLaVA-1.5 turn (its processor has no chat template)."""
    from mmflow.inputs import build_prompt

    return build_prompt(processor, question, inputs="processor")


def _llava_vision(model) -> list[torch.nn.Module]:
    return [model.model.vision_tower, model.model.multi_modal_projector]


def _qwen_vision(model) -> list[torch.nn.Module]:
    return [model.model.visual]


def _llava_arch() -> Arch:
    from shapes_world import train

    return Arch(
        name="shapes-llava",
        build_processor=train.build_processor,
        build_model=train.build_model,
        prompt=llava_prompt,
        image_token="<image>",
        end_of_turn="</s>",
        answer_prefix=" ",
        describe_turn=train.DESCRIBE_TURN,
        vision=_llava_vision,
        save_processor=lambda processor, folder: processor.save_pretrained(folder),
    )


def _qwen_arch() -> Arch:
    return Arch(
        name="shapes-qwen",
        build_processor=build_qwen_processor,
        build_model=build_qwen_model,
        prompt=chat_prompt,
        image_token="<|image_pad|>",
        end_of_turn="<|im_end|>",
        answer_prefix="",
        describe_turn="\n<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
        vision=_qwen_vision,
        save_processor=lambda processor, folder: save_qwen_processor_files(folder, processor.tokenizer),
        mm_token_type_ids=True,
        steps=7000,
        system_turn=f"<|im_start|>system\n{QWEN_VL_SYSTEM}<|im_end|>\n",
        p_no_system=0.5,
    )


#: The embedded models by name.
ARCHS: dict[str, Callable[[], Arch]] = {"shapes-llava": _llava_arch, "shapes-qwen": _qwen_arch}


def arch(name: str) -> Arch:
    """The :class:`Arch` of the embedded model ``name``.

    Raises:
        MmflowError: for a name that is not an embedded model.
    """
    from mmflow.errors import MmflowError

    if name not in ARCHS:
        raise MmflowError(f"MODEL={name!r} is not an embedded model; make toy-model trains one of {sorted(ARCHS)}")
    return ARCHS[name]()


__all__ = ["ARCHS", "Arch", "arch", "INSTRUCTION", "QWEN_VL_SYSTEM"]
