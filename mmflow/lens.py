"""Logit lens: read the residual stream at the last position through the LM head, layer by layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import pandas as pd
import torch

from mmflow import models
from mmflow.inputs import Encoded
from mmflow.models import LlavaModel, decoder_layers

LOWERCASE, CAPITALIZED = "lowercase", "Capitalized"
ANSWER, FALSE_OPTION = "answer", "false option"
#: Names of the two views of the lens, as they appear in figures and CSVs.
WITH_NORM = "with final norm"
WITHOUT_NORM = "without final norm (paper code)"


def token_label(role: str, form: str) -> str:
    """The label of a tracked token, shared by every figure and CSV.

    Example:
        >>> token_label(ANSWER, LOWERCASE)
        'answer (lowercase)'
    """
    return f"{role} ({form})"


@contextlib.contextmanager
def capture_layer_outputs(model: LlavaModel) -> Iterator[list[torch.Tensor]]:
    """Collect the residual stream after every decoder layer (forward hooks, always removed on exit).

    Example::

        with capture_layer_outputs(model) as outputs:
            model(**enc.inputs)
        assert len(outputs) == num_layers(model)
    """
    outputs: list[torch.Tensor] = []

    def hook(_module, _args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def logit_lens(model: LlavaModel, encoded: Encoded, tokens: Mapping[str, int], final_norm: bool = True) -> pd.DataFrame:
    """Probability of each named token at the last position, read off the residual stream after every layer.

    Args:
        model: a loaded LLaVA-family model.
        encoded: the example's input.
        tokens: label -> token id (e.g. from :func:`answer_token_ids`).
        final_norm: unembed after the final norm (default); False projects the raw residual stream.

    Returns:
        Columns ``layer, token, token_id, prob``.
    """
    norm = models.final_norm(model)
    head = model.get_output_embeddings()
    rows = []
    with torch.inference_mode(), capture_layer_outputs(model) as outputs:
        model(**encoded.inputs, use_cache=False, logits_to_keep=1)
        for layer, hidden in enumerate(outputs):
            h = hidden[:, -1]
            probs = torch.softmax(head(norm(h) if final_norm else h)[0].float(), -1)
            rows.extend(
                {"layer": layer, "token": name, "token_id": tid, "prob": float(probs[tid])}
                for name, tid in tokens.items()
            )
    return pd.DataFrame(rows)


def answer_token_ids(tokenizer, word: str) -> dict[str, int]:
    """First token of ``word`` in lowercase and Capitalized form, as the model would emit it after the prompt.

    Returns:
        ``{"lowercase": id, "Capitalized": id}``.
    """
    out = {}
    for name, form in ((LOWERCASE, word.lower()), (CAPITALIZED, word.capitalize())):
        ids = tokenizer(" " + form, add_special_tokens=False)["input_ids"]
        bare = tokenizer(form, add_special_tokens=False)["input_ids"]
        out[name] = ids[0] if tokenizer.decode(ids[:1]).strip() else bare[0]
    return out
