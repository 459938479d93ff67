"""Tiny random Pixtral-12B (a LLaVA with a Pixtral vision tower) and Mistral3 (Mistral-Small-3.1, patch merger)
checkpoints built from config, saved like hub folders with their processor files (image processor config,
processor config, a byte-level BPE tokenizer with Mistral's special tokens, the released chat template), for loading
through the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmflow.replicas.llava import CORPUS

#: The chat template of mistral-community/pixtral-12b (written by transformers' convert_pixtral_weights_to_hf).
PIXTRAL_CHAT_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    "{%- set loop_messages = messages[1:] %}\n{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST]" + system_message + "\\n\\n" }}{%- else %}{{ "[INST]" }}{%- endif %}{%- endif %}'
    '{%- if message["content"] is not string %}{%- for chunk in message["content"] %}'
    '{%- if chunk["type"] == "text" %}{%- if "content" in chunk %}{{- chunk["content"] }}'
    '{%- elif "text" in chunk %}{{- chunk["text"] }}{%- endif %}'
    '{%- elif chunk["type"] == "image" %}{{- "[IMG]" }}{%- else %}'
    '{{- raise_exception("Unrecognized content type!") }}{%- endif %}{%- endfor %}'
    '{%- else %}{{- message["content"] }}{%- endif %}'
    '{%- if message["role"] == "user" %}{{- "[/INST]" }}{%- elif message["role"] == "assistant" %}{{- eos_token}}'
    '{%- else %}{{- raise_exception("Only user and assistant roles are supported, with the exception of an '
    'initial optional system message!") }}{%- endif %}{%- endfor %}'
)
#: The chat template of mistralai/Mistral-Small-3.1-24B-Instruct-2503: a default system prompt with today's date.
MISTRAL3_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in "
    "Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is "
)
MISTRAL3_CHAT_TEMPLATE = (
    '{%- set today = strftime_now("%Y-%m-%d") %}'
    '{%- set default_system_message = "' + MISTRAL3_SYSTEM + '" + today + "." %}'
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST]' }}{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] == 'image' or block['type'] == 'image_url' %}{{- '[IMG]' }}{%- else %}"
    "{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
#: per kind: vision patch, spatial merge, longest edge (the vision tower's largest image)
GEOMETRY = {"pixtral": (16, 1, 128), "mistral3": (14, 2, 168)}


def mistral_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE (tekken style, no prefix space) with Mistral's special tokens; ``adds_bos``: the tokenizer
    puts ``<s>`` in front of every text it encodes with special tokens (Mistral-Small-3.1's does, Pixtral-12B's
    does not)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 + ["You are Mistral Small, a Large Language Model created by"] * 20, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    return fast


def _config(kind: str, tok, layers: int):
    """Config of a tiny ``kind`` ("pixtral" or "mistral3") model whose special-token ids match ``tok``."""
    import transformers

    patch, merge, edge = GEOMETRY[kind]
    text = transformers.MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=None,
        initializer_range=0.1,
        bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=tok.convert_tokens_to_ids("</s>"),
    )
    vision = transformers.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=edge,
        patch_size=patch,
    )
    image = tok.convert_tokens_to_ids("[IMG]")
    if kind == "pixtral":
        config = transformers.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
        )
        return config, transformers.LlavaForConditionalGeneration
    config = transformers.Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=image,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
    )
    return config, transformers.Mistral3ForConditionalGeneration


def build_tiny_pixtral(folder: Path, kind: str = "pixtral", layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` model with its processor files to ``folder`` (as a hub folder lays them out:
    preprocessor_config.json, processor_config.json, tokenizer files, chat_template.json); return the folder."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    torch.manual_seed(seed)
    tok = mistral_tokenizer(adds_bos=kind == "mistral3")
    config, model_class = _config(kind, tok, layers)
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    patch, merge, edge = GEOMETRY[kind]
    PixtralImageProcessorPil(size={"longest_edge": edge}, patch_size={"height": patch, "width": patch}).save_pretrained(
        folder
    )
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type="PixtralImageProcessor", processor_class="PixtralProcessor")
    path.write_text(json.dumps(content, indent=2))
    processor_config = {
        "processor_class": "PixtralProcessor",
        "patch_size": patch,
        "spatial_merge_size": merge,
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    template = PIXTRAL_CHAT_TEMPLATE if kind == "pixtral" else MISTRAL3_CHAT_TEMPLATE
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder
