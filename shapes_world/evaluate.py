"""Held-out accuracy of the embedded models: ``python -m shapes_world.evaluate [--model M] [--n N] [--seed S]``.

For every family, ``N`` questions of ``make_dataset(N, seed)`` (default :data:`world.EVAL_SEED`) are asked in the
model's own prompt (its processor's: LLaVA-1.5's turn for shapes-llava, the Qwen2-VL chat turn for shapes-qwen);
the greedy (argmax) first answer token at the last prompt position is compared case-insensitively with the gold
answer. The same questions are then asked with a blank (all-background) image: accuracy near the text-only prior
shows that answers come from the image. Each model ends with
``toy-eval: model=<m> min_task_accuracy=<x> blank_image_accuracy=<y>``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from mmflow.inputs import build_prompt
from mmflow.models import EMBEDDED_MODELS, load_model
from shapes_world import world


@torch.no_grad()
def first_token_predictions(model, processor, questions: list[str], images: list, batch_size: int = 64) -> list[str]:
    """The argmax next token after each prompt (decoded, without surrounding spaces)."""
    predictions: list[str] = []
    for start in range(0, len(questions), batch_size):
        texts = [build_prompt(processor, q, inputs="processor") for q in questions[start : start + batch_size]]
        inputs = processor(text=texts, images=images[start : start + batch_size], padding=True, return_tensors="pt")
        logits = model(**inputs).logits
        last = inputs["attention_mask"].sum(dim=1) - 1
        ids = logits[torch.arange(len(texts)), last].argmax(dim=-1)
        predictions += [processor.tokenizer.convert_ids_to_tokens(int(i)).strip() for i in ids]
    return predictions


def first_token_accuracy(model, processor, dataset, blank: bool = False) -> dict[str, float]:
    """Per-task accuracy of the first answer token on a :func:`world.make_dataset` split (optionally blank images)."""
    rows = dataset.select_columns(["task", "question", "answer"]).to_list()
    images = [world.blank_image(i) for i in range(len(rows))] if blank else list(dataset["image"])
    predictions = first_token_predictions(model, processor, [r["question"] for r in rows], images)
    hits: dict[str, list[int]] = defaultdict(list)
    for row, pred in zip(rows, predictions):
        hits[row["task"]].append(int(pred.lower() == row["answer"].lower()))
    return {task: sum(h) / len(h) for task, h in hits.items()}


def evaluate(model_name: str, n: int, seed: int) -> dict[str, float]:
    """Print one model's per-task accuracy with real and with blank images; return the summary numbers."""
    model, processor = load_model(model_name)
    dataset = world.make_dataset(n, seed)
    accuracy = first_token_accuracy(model, processor, dataset)
    blank = first_token_accuracy(model, processor, dataset, blank=True)
    print(f"{model_name} (seed {seed}, {n} questions per task)")
    print(f"{'task':<12} {'accuracy':>9} {'blank':>7}")
    for task in world.TASKS:
        print(f"{task:<12} {accuracy[task]:>9.3f} {blank[task]:>7.3f}")
    summary = {"min_task_accuracy": min(accuracy.values()), "blank_image_accuracy": sum(blank.values()) / len(blank)}
    print(
        f"toy-eval: model={model_name} min_task_accuracy={summary['min_task_accuracy']:.3f} "
        f"blank_image_accuracy={summary['blank_image_accuracy']:.3f}"
    )
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        help="model name or folder (see mmflow.models.load_model); repeatable; default: every embedded model",
    )
    parser.add_argument("--n", type=int, default=200, help="questions per family")
    parser.add_argument("--seed", type=int, default=world.EVAL_SEED, help="split seed (training never uses it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.model or list(EMBEDDED_MODELS):
        evaluate(name, args.n, args.seed)


if __name__ == "__main__":
    main()
