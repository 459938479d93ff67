"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints built from config, saved like hub folders with their processor files
(image processor config, tokenizer files, the family's chat template), for loading through the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmflow.replicas.llava import CORPUS

#: The official Qwen2-VL / Qwen2.5-VL chat template (chat_template.json of the released checkpoints).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PATCH, MERGE = 14, 2  # 28-px cells per image token
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24  # at most 24 image tokens


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen2 style) trained on a small corpus, carrying the Qwen-VL special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 + ["You are a helpful assistant. system user assistant"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def _configs(kind: str, tok, layers: int):
    """Config of a tiny ``kind`` ("qwen2_vl" or "qwen2_5_vl") model whose special-token ids match ``tok``."""
    import transformers

    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start")}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.1,
    )
    vision = dict(depth=2, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=56)
        vision.update(fullatt_block_indexes=[1])
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(kind)
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
    )
    return config, model_class


def build_tiny_qwen(folder: Path, kind: str = "qwen2_vl", layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` model with its processor files to ``folder`` (as a hub folder lays them out:
    preprocessor_config.json, tokenizer files, chat_template.json); return the folder."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    config, model_class = _configs(kind, tok, layers)
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[kind]
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="Qwen2VLImageProcessor", processor_class=processor_class)
    path.write_text(json.dumps(content, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}))
    return folder
