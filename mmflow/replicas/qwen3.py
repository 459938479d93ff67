"""Tiny random Qwen3-VL / Qwen3-VL-MoE checkpoints built from config, saved like hub folders with their processor
files (image processor config with 16 px patches, tokenizer files, the Qwen3-VL chat template), for loading through
the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmflow.replicas.qwen import qwen_tokenizer

#: The Qwen3-VL-Instruct chat template (chat_template.json of the released checkpoints) without its tool-calling
#: branches, which mmflow never uses: a system turn only when one is given (no default system prompt), the image
#: framed by vision markers where the user's content puts it, and ``<|im_start|>assistant\n`` as the generation
#: prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    r"{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    r"{%- macro render_content(content, do_vision_count) %}{%- if content is string %}{{- content }}{%- else %}"
    r"{%- for item in content %}{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    r"{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    r"{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    r"{%- elif 'video' in item or item.type == 'video' %}"
    r"{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    r"{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    r"{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    r"{%- if messages[0].role == 'system' %}"
    r"{{- '<|im_start|>system\n' + render_content(messages[0].content, false) + '<|im_end|>\n' }}{%- endif %}"
    r"{%- for message in messages %}{%- set content = render_content(message.content, true) %}"
    r"{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    r"{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    r"{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    r"{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
PATCH, MERGE = 16, 2  # 32-px cells per image token
MIN_PIXELS, MAX_PIXELS = 64 * 64, 32 * 32 * 24  # at most 24 image tokens
DEEPSTACK = [0, 1]  # vision layers whose merged features are added to the outputs of decoder layers 0 and 1
KINDS = ("qwen3_vl", "qwen3_vl_moe")


def _config(kind: str, tok, layers: int):
    """Config and model class of a tiny ``kind`` model whose special-token ids match ``tok``."""
    import transformers

    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start")}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=64,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=DEEPSTACK,
    )
    if kind == "qwen3_vl":
        config_class, model_class = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    elif kind == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
        config_class, model_class = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
    else:
        raise ValueError(kind)
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return config, model_class


def build_tiny_qwen3(folder: Path, kind: str = "qwen3_vl", layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` model with its processor files to ``folder`` (as a hub folder lays them out:
    preprocessor_config.json with 16 px patches and a 2x2 merge, tokenizer files, chat_template.json); return it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    config, model_class = _config(kind, tok, layers)
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor")
    path.write_text(json.dumps(content, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    return folder
