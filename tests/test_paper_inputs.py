"""inputs="paper": the official prompts and pixels, checked against independently written strings and an
independent pad -> resize -> normalise (LLaVA-1.5) and anyres (LLaVA-NeXT) computation, at the real geometry
(336 px, patch 14) with the real SentencePiece tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import mmflow_utils as mu

SIDE, PATCH = 336, 14
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
QUESTION = "Is the surfer to the left or to the right of the surfboard?"
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: <image>\n" + QUESTION + " \n"
    "Answer the question using a single word or phrase. ASSISTANT:"
)
LLAMA3_TEMPLATE = (  # Meta's Llama-3 chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def clip_processor(**extra):
    common = dict(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}, image_mean=MEAN, image_std=STD
    )
    return CLIPImageProcessorPil(**common, **extra)


def text_config(vocab):
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )


@pytest.fixture
def sp_tokenizer(tmp_path):
    """A fresh real SentencePiece tokenizer (tests add tokens to it)."""
    return tiny.sentencepiece_tokenizer(tmp_path / "sp")


def llava15(tok):
    processor = LlavaProcessor(
        image_processor=clip_processor(),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(image_size=SIDE, patch_size=PATCH)
    config = LlavaConfig(
        vision_config=vision, text_config=text_config(len(tok)), image_token_index=tok.convert_tokens_to_ids("<image>")
    )
    return processor, config


def photo(size=(500, 375), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def normalise(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    return torch.tensor(((pixels - MEAN) / STD).transpose(2, 0, 1), dtype=torch.float32)


def test_llava15_paper_prompt_is_the_official_vicuna_v1_string(sp_tokenizer):
    processor, config = llava15(sp_tokenizer)
    enc = mu.encode(processor, photo(), QUESTION, options=("left", "right"), inputs="paper", config=config)
    expected = processor(text=VICUNA, images=photo(), return_tensors="pt")["input_ids"][0]
    assert enc.prompt == VICUNA and torch.equal(enc.inputs["input_ids"][0], expected)
    assert len(enc.groups["image"]) == (SIDE // PATCH) ** 2
    assert processor.tokenizer.decode(enc.inputs["input_ids"][0][enc.groups["question"]]).strip() == QUESTION
    processor_mode = mu.encode(processor, photo(), QUESTION)  # the llava-hf form: no system prompt, no space
    assert "A chat between" not in processor_mode.prompt and f"{QUESTION}\nAnswer" in processor_mode.prompt


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (336, 336), (1000, 120)])
def test_llava15_paper_pixels_are_padded_to_square_with_the_mean_colour(sp_tokenizer, size):
    processor, config = llava15(sp_tokenizer)
    image = photo(size)
    enc = mu.encode(processor, image, QUESTION, inputs="paper", config=config)
    # independent: expand2square with the mean colour, bicubic resize to 336 x 336, rescale, normalise
    W, H = size
    side = max(W, H)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in MEAN]
    canvas[(side - H) // 2 : (side - H) // 2 + H, (side - W) // 2 : (side - W) // 2 + W] = np.asarray(image)
    expected = normalise(Image.fromarray(canvas).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    assert (enc.inputs["pixel_values"][0] - expected).abs().max() < 1e-5
    if W != H:  # and the processor's own (crop) view differs
        cropped = mu.encode(processor, image, QUESTION).inputs["pixel_values"][0]
        assert (cropped - expected).abs().max() > 0.1


def original_anyres(image: Image.Image) -> torch.Tensor:
    """LLaVA-NeXT's process_anyres_image, written from its description: best resolution, resize keeping the aspect
    ratio and pad (black, centred), 336-px tiles, and the whole image squashed to 336 x 336 first."""
    W, H = image.size
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in PINPOINTS:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        if eff > best_eff or (eff == best_eff and w * h - eff < best_waste):
            best, best_eff, best_waste = (w, h), eff, w * h - eff
    tw, th = best
    sw, sh = tw / W, th / H
    nw, nh = (tw, min(math.ceil(H * sw), th)) if sw < sh else (min(math.ceil(W * sh), tw), th)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((x, y, x + SIDE, y + SIDE)) for y in range(0, th, SIDE) for x in range(0, tw, SIDE)]
    base = image.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    return torch.stack([normalise(t) for t in [base, *tiles]])


def llama3_next(tok):
    tok.add_special_tokens(
        {"additional_special_tokens": ["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tok.chat_template = LLAMA3_TEMPLATE
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": SIDE},
        crop_size={"height": SIDE, "width": SIDE},
        image_mean=MEAN,
        image_std=STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=SIDE, patch_size=PATCH),
        text_config=text_config(len(tok)),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return processor, config


def test_llama3_next_paper_prompt_and_anyres_pixels(sp_tokenizer):
    processor, config = llama3_next(sp_tokenizer)
    image = photo((500, 375))
    enc = mu.encode(processor, image, QUESTION, inputs="paper", config=config)
    system = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language."
    )
    expected_text = (
        f"{processor.tokenizer.bos_token}<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{QUESTION} \nAnswer the question using a "
        "single word or phrase.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )
    assert enc.prompt == expected_text
    expected = processor(text=expected_text, images=image, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(enc.inputs["input_ids"][0], expected[0])
    pixels = enc.inputs["pixel_values"][0]
    reference = original_anyres(image)
    assert pixels.shape == reference.shape and (pixels - reference).abs().max() < 1e-5


def test_llama3_next_paper_inputs_have_one_bos(sp_tokenizer):
    """The llava_llama_3 prompt spells <|begin_of_text|> (the tokenizer's BOS) and the tokenizer adds a BOS to what it
    encodes: the official code's tokenizer_image_token keeps one, so the encoded input has exactly one, at 0."""
    sp_tokenizer.add_bos_token = True  # as Llama-3's tokenizer: it puts its BOS in front of what it encodes
    processor, config = llama3_next(sp_tokenizer)
    tok = processor.tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # so a second one could appear
    ids = mu.encode(processor, photo(), QUESTION, inputs="paper", config=config).inputs["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    plain = mu.encode(processor, photo(), QUESTION, inputs="processor").inputs["input_ids"][0].tolist()
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1  # from the template or the tokenizer


def test_paper_inputs_refuse_backbones_the_paper_did_not_use(sp_tokenizer):
    processor, _ = llava15(sp_tokenizer)
    mistral = MistralConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    config = LlavaConfig(vision_config=CLIPVisionConfig(image_size=SIDE, patch_size=PATCH), text_config=mistral)
    with pytest.raises(mu.MmflowError, match="language model is 'mistral': use inputs='processor'"):
        mu.encode(processor, photo(), QUESTION, inputs="paper", config=config)
    with pytest.raises(mu.MmflowError, match="inputs must be one of"):
        mu.Run.load("shapes-llava", inputs="official")
