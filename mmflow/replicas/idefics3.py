"""Tiny random Idefics3 (the class of SmolVLM v1) and SmolVLM2 checkpoints (SigLIP-style tower, Llama backbone at
``model.text_model``, image splitting into tiles plus a global image, pixel shuffle) built from config and saved like
hub folders with their processor files, for loading through the normal loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmflow.replicas.llava import CORPUS

#: The released SmolVLM chat template (chat_template.json of HuggingFaceTB/SmolVLM-256M-Instruct): no system prompt,
#: ``User:`` right before an image (``User: `` before text), each turn closed by ``<end_of_utterance>\n``.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *ROW_COL,
]
#: a tile is 64 px: 16 x 16 patches of 4 px, shuffled 4 x 4 into 16 tokens of 16 px (SmolVLM-256M: 512 px tiles,
#: 16 px patches, scale 4: 64 tokens); images are resized to a longest edge of 128 px: at most 2 x 2 tiles
TILE, PATCH, SCALE, LONGEST = 64, 4, 4, 128
TOKENS_PER_TILE = (TILE // PATCH // SCALE) ** 2


def idefics3_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (SmolVLM style, no BOS added by the tokenizer: the chat template writes it) trained on a
    small corpus, carrying the Idefics3 special tokens (image, tile tags, global tag, end of utterance)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 + ["User: Assistant: User:\nAssistant:"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[2:]})
    fast.chat_template = SMOLVLM_CHAT_TEMPLATE
    return fast


def _classes(kind: str):
    """(config, vision config, model, PIL image processor) classes and the hub names of the image processor and the
    processor of ``kind``: "idefics3" (SmolVLM v1's class) or "smolvlm" (SmolVLM2)."""
    import transformers

    if kind == "idefics3":
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig as vision
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as pil

        prefix = "Idefics3"
    elif kind == "smolvlm":
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig as vision
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as pil

        prefix = "SmolVLM"
    else:
        raise ValueError(kind)
    config, model = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForConditionalGeneration")
    return config, vision, model, pil, f"{prefix}ImageProcessor", f"{prefix}Processor"


def build_tiny_idefics3(folder: Path, kind: str = "idefics3", layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` model ("idefics3" or "smolvlm") with its processor files to ``folder`` (as a hub
    folder lays them out: preprocessor_config.json, processor_config.json, tokenizer files, chat_template.json);
    return the folder."""
    from transformers import LlamaConfig

    config_class, vision_class, model_class, pil_class, image_processor_type, processor_class = _classes(kind)
    torch.manual_seed(seed)
    tok = idefics3_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = vision_class(
        image_size=TILE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = config_class(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        scale_factor=SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image_processor = pil_class(
        size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE}, do_image_splitting=True
    )
    image_processor.save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    content = json.loads(path.read_text())
    content.update(image_processor_type=image_processor_type, processor_class=processor_class)
    path.write_text(json.dumps(content, indent=2))
    processor_config = {"processor_class": processor_class, "image_seq_len": TOKENS_PER_TILE}
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}))
    return folder
