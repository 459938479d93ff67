"""A tiny random LLaVA-OneVision checkpoint (SigLIP tower, Qwen2 backbone, anyres_max_9) built from config and
saved like a hub folder with its processor files, for loading through the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmflow.replicas.llava import CORPUS

#: The llava-hf LLaVA-OneVision chat template (images first, a space after the role, no system prompt).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
TILE, PATCH = 56, 14  # 4 x 4 patches per tile, no CLS (SigLIP)
#: up to 4 x 4 tiles: a 16 x 16 grid exceeds anyres_max_9 (9 tiles) by more than 1.1 and is downsampled
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112], [168, 168], [224, 224]]


def onevision_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen2 style) trained on a small corpus, with OneVision's special tokens."""
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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = ONEVISION_CHAT_TEMPLATE
    return fast


def build_tiny_onevision(folder: Path, layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-OneVision model with its processor files to ``folder``; return the folder."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    torch.manual_seed(seed)
    tok = onevision_tokenizer()
    text = Qwen2Config(
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
    )
    vision = SiglipVisionConfig(
        image_size=TILE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS, do_pad=True
    )
    image_processor.save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="LlavaOnevisionImageProcessor", processor_class="LlavaOnevisionProcessor")
    path.write_text(json.dumps(content, indent=2))
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (TILE // PATCH) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_token": "<image>",
        "video_token": "<video>",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": ONEVISION_CHAT_TEMPLATE}))
    return folder
