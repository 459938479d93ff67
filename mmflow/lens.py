"""Logit lens: read the residual stream at the last position through the LM head, layer by layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import pandas as pd
import torch

from mmflow import models
from mmflow.errors import MmflowError
from mmflow.inputs import Encoded
from mmflow.models import LlavaModel, decoder_layers

LOWERCASE, CAPITALIZED = "lowercase", "Capitalized"
ANSWER, FALSE_OPTION = "answer", "false option"
#: The views of the lens, each named for what it is, as they appear in figures and CSVs.
WITH_NORM = "with final norm"  # every layer's output through the final norm, then the LM head
RAW = "raw residual stream (no final norm)"  # every layer's output straight into the LM head
PAPER_VIEW = "paper's code: hidden_states (top normed)"  # the official code: embeddings, raw layers, normed top
LENS_VIEWS = {"final_norm": WITH_NORM, "raw": RAW, "paper": PAPER_VIEW}


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


def logit_lens(
    model: LlavaModel, encoded: Encoded, tokens: Mapping[str, int], views: Sequence[str] = ("final_norm",)
) -> pd.DataFrame:
    """Probability of each named token at the last position, read off the residual stream layer by layer.

    Args:
        model: a loaded LLaVA-family model.
        encoded: the example's input.
        tokens: label -> token id (e.g. from :func:`answer_token_ids`).
        views: keys of :data:`LENS_VIEWS`:

            * ``"final_norm"``: each layer's output through the final norm and the LM head (the model's own
              read-out applied early), layers 0..L-1;
            * ``"raw"``: each layer's output straight into the LM head, layers 0..L-1;
            * ``"paper"``: what the official code plots: transformers' ``hidden_states`` into the LM head, i.e. the
              embeddings (layer -1), the raw outputs of layers 0..L-2, and the final-normed output of layer L-1
              (so its top point is the model's output distribution).

    Returns:
        Columns ``view, layer, token, token_id, prob`` (``view`` holds the label of :data:`LENS_VIEWS`).

    Raises:
        MmflowError: for an unknown view.
    """
    unknown = [v for v in views if v not in LENS_VIEWS]
    if unknown or not views:
        raise MmflowError(f"views must be some of {list(LENS_VIEWS)}, got {list(views)!r}")
    norm = models.final_norm(model)
    head = model.get_output_embeddings()
    rows = []

    def read(view: str, layer: int, hidden: torch.Tensor) -> None:
        probs = torch.softmax(head(hidden[:, -1])[0].float(), -1)
        rows.extend(
            {"view": LENS_VIEWS[view], "layer": layer, "token": name, "token_id": tid, "prob": float(probs[tid])}
            for name, tid in tokens.items()
        )

    with torch.inference_mode(), capture_layer_outputs(model) as outputs:
        out = model(**encoded.inputs, use_cache=False, logits_to_keep=1, output_hidden_states="paper" in views)
        for view in views:
            if view == "paper":
                for index, hidden in enumerate(out.hidden_states):
                    read(view, index - 1, hidden)
            else:
                for layer, hidden in enumerate(outputs):
                    read(view, layer, norm(hidden) if view == "final_norm" else hidden)
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
