"""Tiny random LLaVA / LLaVA-NeXT replicas built from config, with processors that agree with them.

Saved to a folder and loaded back through :func:`mmflow_utils.load_model`, exactly as a hub id would be (the
tests' ``tiny`` module re-exports these names).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

CORPUS = [
    "USER: ASSISTANT: Answer the question using a single word or phrase.",
    "Is the square red or blue? Which shape is red, the circle or the square?",
    "Is the circle to the left or to the right of the square? What do the circle and the square have in common?",
    "Are there either circles or triangles that are red? In which part of the image is the triangle?",
    "Is the surfer to the left or to the right of the surfboard? Is the jar full or empty? Yes No Red Left",
]
IMAGE = 56  # vision input side (px)
PATCH = 14  # -> 4 x 4 patches per tile
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Llama-3 style, 'Ġ' for spaces) trained on a small corpus, with '<image>'."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def sentencepiece_tokenizer(folder: Path) -> LlamaTokenizer:
    """The real SentencePiece tokenizer of llava-v1.6-mistral-7b (shipped in mistral_common), with '<image>'."""
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(source, folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _text_config(vocab: int, layers: int, backbone: str = "llama", **overrides):
    """A tiny text config of ``backbone`` ("llama", "mistral" or "qwen2": the language models LLaVA checkpoints use)."""
    import transformers

    config_class = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[backbone]
    params = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    params.update(overrides)
    return getattr(transformers, config_class)(**params)


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )


def build_tiny(
    folder: Path,
    kind: str = "llava",
    tokenizer=None,
    pad: bool = False,
    layers: int = 6,
    seed: int = 0,
    **text_overrides,
) -> Path:
    """Save a tiny random ``kind`` ('llava' or 'llava_next') model + processor to ``folder``; return it.

    ``pad`` selects LLaVA-1.5's pad-to-square preprocessing (``LlavaImageProcessor(do_pad=True)``) instead of
    resize + centre crop.
    """
    torch.manual_seed(seed)
    tok = tokenizer or byte_level_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    common = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    config_args = dict(
        vision_config=_vision_config(),
        text_config=_text_config(len(tok), layers, **text_overrides),
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor_args = dict(
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    if kind == "llava":
        image_processor = LlavaImageProcessorPil(do_pad=True, **common) if pad else CLIPImageProcessorPil(**common)
        model = LlavaForConditionalGeneration(LlavaConfig(**config_args))
        processor = LlavaProcessor(image_processor=image_processor, **processor_args)
    elif kind == "llava_next":
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=GRID_PINPOINTS, **common)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**config_args, image_grid_pinpoints=GRID_PINPOINTS))
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_args)
    else:
        raise ValueError(kind)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def offline_env() -> None:
    """Make sure nothing reaches the hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
