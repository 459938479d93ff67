"""The paper's vocabulary: tasks, token-group flows, the prompt, the window rule (a leaf module).

Everything here is plain data or a pure function, so the analysis library and the shapes world can share it
without importing each other. A new flow of the paper goes into :data:`FLOWS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmflow.errors import MmflowError

#: The paper's six GQA question families, in the order of its figures (the shapes world seeds by this order).
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
#: Tasks whose questions offer two options ("X or Y").
CHOOSE_TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel")
#: Per task, the CSV column prefixes naming the objects its question is about (the paper's choice of boxes).
OBJECT_COLUMNS = {
    "ChooseAttr": ("central object",),
    "ChooseCat": ("central object",),
    "QueryAttr": ("central object",),
    "ChooseRel": ("object1", "object2"),
    "CompareAttr": ("object1", "object2"),
    "LogicalObj": ("object1", "object2"),
}

INSTRUCTION = "Answer the question using a single word or phrase."
#: The LLaVA-1.5 single-turn prompt, used where a processor has no chat template.
LLAVA15_TEMPLATE = "USER: <image>\n{question}\n" + INSTRUCTION + " ASSISTANT:"

#: How inputs are built: "paper" as the official code did (its conversation templates, pad-to-square), or
#: "processor" as the checkpoint's Hugging Face processor does (its chat template, resize and crop).
INPUTS = ("paper", "processor")
#: The user turn of the official code: the image, the question, a space, a newline and the instruction.
PAPER_USER = "<image>\n{question} \n" + INSTRUCTION
#: System prompt of the vicuna_v1 conversation (LLaVA-1.5, LLaVA-1.6-Vicuna); turns "USER: ..." and "ASSISTANT:".
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: System prompt of the llava_llama_3 conversation (Llama3-LLaVA-NeXT); the official code appends " \n".
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
LLAMA3_SUFFIX = " \n"
#: Default system prompt of the Qwen2-VL / Qwen2.5-VL chat format (inserted when no system turn is given) and of
#: LLaVA-OneVision's qwen_1_5 conversation.
QWEN_VL_SYSTEM = "You are a helpful assistant."
#: The official Qwen2-VL / Qwen2.5-VL single-image turn: ChatML with the image framed by vision markers.
QWEN_VL_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "{text}<|im_end|>\n<|im_start|>assistant\n"
)
#: The official Qwen3-VL single-image turn: its released chat template adds no system turn unless one is given.
QWEN3_VL_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)
#: The official LLaVA-OneVision turn (``conv_templates["qwen_1_5"]`` of LLaVA-NeXT): ChatML, ``<image>`` on its line.
QWEN15_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n{text}<|im_end|>\n<|im_start|>assistant\n"
)
#: System message of InternVL's ``internvl2_5`` conversation (InternVL 2.5 / 3), which its chat code always sends.
INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
#: The official InternVL turn (``internvl2_5``, MPT separators): ChatML, the image (``<IMG_CONTEXT>``, which the
#: HF processor expands to ``<img>`` + tiles x 256 tokens + ``</img>``) on its own line before the question.
INTERNVL_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n{text}<|im_end|>\n<|im_start|>assistant\n"
)
#: Mistral's official single-image turn (``mistral_common``: Pixtral-12B, Mistral-Small-3.1): BOS, the image, then
#: the text, in one ``[INST]`` block with no system prompt.
MISTRAL_TEMPLATE = "<s>[INST][IMG]{text}[/INST]"
#: The official Gemma 3 single-image turn (chat template of google/gemma-3-4b-it): ``<bos>``, no system prompt,
#: ``<start_of_image>`` where the image goes (the processor expands it), the text part trimmed.
GEMMA3_TEMPLATE = "<bos><start_of_turn>user\n<start_of_image>{text}<end_of_turn>\n<start_of_turn>model\n"
#: The official Idefics3 / SmolVLM turn (the released chat templates): the template's opening token (the tokenizer's
#: BOS: Idefics3-8B's ``<|begin_of_text|>``, SmolVLM's ``<|im_start|>``), ``User:`` right before the image, no system
#: prompt, the turn closed by ``<end_of_utterance>``.
IDEFICS3_TEMPLATE = "{bos}User:<image>{text}<end_of_utterance>\nAssistant:"

#: The paper's flows as (source group, target group): the target's attention to the source is blocked.
FLOWS = {
    "Question->Last": ("question", "last"),
    "Image->Last": ("image", "last"),
    "Last->Last": ("last", "last"),
    "Image->Question": ("image", "question"),
    "Related patches->Question": ("related_patches", "question"),
    "Other patches->Question": ("other_patches", "question"),
}
TO_LAST_FLOWS = ("Question->Last", "Image->Last", "Last->Last")
IMAGE_TO_QUESTION = "Image->Question"
PATCH_FLOWS = ("Related patches->Question", "Other patches->Question")
#: Token groups that need the example's boxes pushed through the image preprocessing.
PATCH_GROUPS = ("related_patches", "other_patches")

#: The paper's window: 9 layers for its 32-40-layer models.
PAPER_WINDOW = 9


def llava15_prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for ``question``.

    Example:
        >>> llava15_prompt("Is it red?")
        'USER: <image>\\nIs it red?\\nAnswer the question using a single word or phrase. ASSISTANT:'
    """
    return LLAVA15_TEMPLATE.format(question=question)


def vicuna_prompt(question: str) -> str:
    """The official vicuna_v1 prompt for ``question`` (LLaVA-1.5, LLaVA-1.6-Vicuna).

    Example:
        >>> vicuna_prompt("Q?").startswith("A chat between"), vicuna_prompt("Q?").split("USER: ")[1]
        (True, '<image>\\nQ? \\nAnswer the question using a single word or phrase. ASSISTANT:')
    """
    return f"{VICUNA_SYSTEM} USER: {PAPER_USER.format(question=question)} ASSISTANT:"


def qwen_vl_prompt(question: str) -> str:
    """The official Qwen2-VL / Qwen2.5-VL prompt for ``question`` (default system prompt, the image first, then the
    question and the paper's short-answer instruction), as the released chat template renders it.

    Example:
        >>> print(qwen_vl_prompt("Q?"))
        <|im_start|>system
        You are a helpful assistant.<|im_end|>
        <|im_start|>user
        <|vision_start|><|image_pad|><|vision_end|>Q?
        Answer the question using a single word or phrase.<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    return QWEN_VL_TEMPLATE.format(system=QWEN_VL_SYSTEM, text=f"{question}\n{INSTRUCTION}")


def qwen3_vl_prompt(question: str) -> str:
    """The official Qwen3-VL prompt for ``question``, as the released chat template renders it: no system turn (the
    template adds none by default, unlike Qwen2-VL's), the image first, then the question and the paper's
    short-answer instruction.

    Example:
        >>> print(qwen3_vl_prompt("Q?"))
        <|im_start|>user
        <|vision_start|><|image_pad|><|vision_end|>Q?
        Answer the question using a single word or phrase.<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    return QWEN3_VL_TEMPLATE.format(text=f"{question}\n{INSTRUCTION}")


def qwen15_prompt(question: str) -> str:
    """The official LLaVA-OneVision prompt for ``question``: the ``qwen_1_5`` conversation of the LLaVA-NeXT code
    (default system prompt, ``<image>`` on its own line, then the question and the paper's instruction). The
    llava-hf chat template differs (no system prompt, a space after the role).

    Example:
        >>> print(qwen15_prompt("Q?"))
        <|im_start|>system
        You are a helpful assistant.<|im_end|>
        <|im_start|>user
        <image>
        Q?
        Answer the question using a single word or phrase.<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    return QWEN15_TEMPLATE.format(system=QWEN_VL_SYSTEM, text=f"{question}\n{INSTRUCTION}")


def internvl_prompt(question: str) -> str:
    """The official InternVL 2.5 / 3 prompt for ``question``: the ``internvl2_5`` conversation of InternVL's chat
    code (its system message, the image on its own line, then the question and the paper's instruction). The HF
    chat template of the -hf checkpoints sends no system message.

    Example:
        >>> prompt = internvl_prompt("Q?")
        >>> prompt.startswith("<|im_start|>system\\n" + INTERNVL_SYSTEM + "<|im_end|>\\n")
        True
        >>> print(prompt[prompt.index("<|im_start|>user"):])
        <|im_start|>user
        <IMG_CONTEXT>
        Q?
        Answer the question using a single word or phrase.<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    return INTERNVL_TEMPLATE.format(system=INTERNVL_SYSTEM, text=f"{question}\n{INSTRUCTION}")


def mistral_prompt(question: str) -> str:
    """Mistral's official prompt for ``question`` (Pixtral-12B, Mistral-Small-3.1): the ``mistral_common`` encoding
    of one user message holding the image, then the question and the paper's instruction.

    Example:
        >>> mistral_prompt("Q?")
        '<s>[INST][IMG]Q?\\nAnswer the question using a single word or phrase.[/INST]'
    """
    return MISTRAL_TEMPLATE.format(text=f"{question}\n{INSTRUCTION}")


def gemma3_prompt(question: str) -> str:
    """The official Gemma 3 prompt for ``question`` (the image first, then the question and the paper's instruction),
    as the released chat template renders it; the processor expands ``<start_of_image>`` into
    ``\\n\\n<start_of_image>`` + the image's soft tokens + ``<end_of_image>\\n\\n``.

    Example:
        >>> print(gemma3_prompt("Q?"))
        <bos><start_of_turn>user
        <start_of_image>Q?
        Answer the question using a single word or phrase.<end_of_turn>
        <start_of_turn>model
        <BLANKLINE>
    """
    return GEMMA3_TEMPLATE.format(text=f"{question}\n{INSTRUCTION}")


def idefics3_prompt(question: str, bos: str) -> str:
    """The official Idefics3 / SmolVLM prompt for ``question`` (the image, the question and the paper's short-answer
    instruction in the user's turn), as the released chat templates render it; ``bos`` is the template's opening
    token (the tokenizer's BOS).

    Example:
        >>> print(idefics3_prompt("Q?", "<|im_start|>"))
        <|im_start|>User:<image>Q?
        Answer the question using a single word or phrase.<end_of_utterance>
        Assistant:
    """
    return IDEFICS3_TEMPLATE.format(bos=bos, text=f"{question}\n{INSTRUCTION}")


def default_window(n_layers: int) -> int:
    """The window size k: the paper's 9 for 32-40-layer models, about L/4 (odd, so it has a centre) below.

    Args:
        n_layers: number of decoder layers of the language model.

    Returns:
        The number of layers in each knockout window.

    Example:
        >>> [default_window(n) for n in (8, 16, 24, 32, 40)]
        [3, 5, 7, 9, 9]
    """
    return min(PAPER_WINDOW, 2 * round(n_layers / 8) + 1)


def window_layers(centre: int, k: int, n_layers: int) -> range:
    """The paper's window of ``k`` layers centred on ``centre``, truncated (not shifted) at the edges.

    An even ``k`` has no middle layer: the window then reaches ``k // 2`` layers below the centre and
    ``k // 2 - 1`` above it.

    Args:
        centre: the window's centre layer.
        k: window size in layers.
        n_layers: number of decoder layers.

    Returns:
        The layers of the window.

    Example:
        >>> window_layers(4, 3, 8), window_layers(0, 3, 8), window_layers(7, 9, 8), window_layers(4, 4, 8)
        (range(3, 6), range(0, 2), range(3, 8), range(2, 6))
    """
    return range(max(0, centre - k // 2), min(n_layers, centre - (-k // 2)))


def layer_third(layer: int, n_layers: int) -> str:
    """Which third of the model a layer lies in: ``"lower"``, ``"middle"`` or ``"upper"``.

    Example:
        >>> [layer_third(layer, 8) for layer in (0, 2, 3, 5, 6, 7)]
        ['lower', 'lower', 'middle', 'middle', 'upper', 'upper']
    """
    return ("lower", "middle", "upper")[min(2, 3 * layer // n_layers)]


Flow = str | tuple[Any, Any]


def flow_name(flow: Flow) -> str:
    """The display name of a flow: itself if a string, else ``"source->target"``.

    Example:
        >>> flow_name("Image->Last"), flow_name(([0, 1], [5]))
        ('Image->Last', '[0, 1]->[5]')
    """
    return flow if isinstance(flow, str) else "->".join(map(str, flow))


def flow_parts(flow: Flow, groups: Mapping[str, Sequence[int]] | None = None) -> tuple[Any, Any]:
    """(source, target) of a flow, each a group name or positions.

    Args:
        flow: a name from :data:`FLOWS`, ``"group->group"``, or a (sources, targets) pair.
        groups: the example's groups, only to list them in the error message.

    Returns:
        The (source, target) pair.

    Raises:
        MmflowError: if ``flow`` is none of the above.

    Example:
        >>> flow_parts("Image->Question"), flow_parts("true_option -> last"), flow_parts(([1, 2], [9]))
        (('image', 'question'), ('true_option', 'last'), ([1, 2], [9]))
    """
    if not isinstance(flow, str):
        return tuple(flow)
    if flow in FLOWS:
        return FLOWS[flow]
    if "->" in flow:
        return tuple(part.strip() for part in flow.split("->", 1))
    known = f" with groups {sorted(groups)}" if groups is not None else ""
    raise MmflowError(f"Unknown flow {flow!r}: use one of {list(FLOWS)} or 'source->target'{known}")


def flows_need_patches(flows: Sequence[Flow]) -> bool:
    """True if any flow names a patch group (see :data:`PATCH_GROUPS`).

    Example:
        >>> flows_need_patches(TO_LAST_FLOWS), flows_need_patches(PATCH_FLOWS)
        (False, True)
        >>> flows_need_patches(["related_patches->last"])
        True
    """
    return any(part in PATCH_GROUPS for flow in flows for part in flow_parts(flow) if isinstance(part, str))
