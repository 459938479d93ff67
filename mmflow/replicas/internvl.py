"""Tiny random InternVL (HF-native) checkpoints built from config, with a Qwen2, Llama or Qwen3 backbone, saved like
hub folders with their processor files (GotOcr2 image processor config with dynamic tiles, processor config,
tokenizer with InternVL's image tokens, the HF chat template), for loading through the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmflow.replicas.llava import CORPUS

#: The InternVL-hf chat template (convert_internvl_weights_to_hf.py): no system turn unless given, the image as
#: ``<IMG_CONTEXT>\n`` before the text.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
#: InternVL's image tokens, as the tokenizer names them (``extra_special_tokens`` of the released tokenizers).
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
TILE, PATCH = 84, 14  # 6 x 6 patches per tile, pixel shuffle 0.5: 3 x 3 image tokens of 28 px per tile
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2
MAX_PATCHES = 4  # at most 4 tiles + the thumbnail
BACKBONES = ("qwen2", "llama", "qwen3")


def internvl_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen2 style) trained on a small corpus and InternVL's system message, carrying InternVL's
    image tokens as named special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 + [SYSTEM, "system user assistant"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=IMAGE_TOKENS,
    )
    fast.chat_template = INTERNVL_CHAT_TEMPLATE
    return fast


def _text_config(backbone: str, tok, layers: int):
    """A tiny ``backbone`` language-model config whose special-token ids match ``tok``."""
    import transformers

    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    configs = {"qwen2": "Qwen2Config", "llama": "LlamaConfig", "qwen3": "Qwen3Config"}
    if backbone == "qwen3":
        common["head_dim"] = 16
    return getattr(transformers, configs[backbone])(**common)


def build_tiny_internvl(folder: Path, backbone: str = "qwen2", layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random InternVL model with a ``backbone`` language model and its processor files to ``folder``
    (as a hub folder lays them out: preprocessor_config.json, processor_config.json, tokenizer files,
    chat_template.json); return the folder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    tok = internvl_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=PATCH,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_text_config(backbone, tok, layers),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_to_patches=False,  # as released: the processor turns tiling on (its images_kwargs)
        min_patches=1,
        max_patches=MAX_PATCHES,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="GotOcr2ImageProcessor", processor_class="InternVLProcessor")
    path.write_text(json.dumps(content, indent=2))
    processor_config = {"image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": INTERNVL_CHAT_TEMPLATE}))
    return folder
