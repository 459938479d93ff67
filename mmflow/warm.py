"""Notebook 6's other models, computed while the per-model notebooks run: ``make reproduce`` starts this beside
notebooks 1-4 (``python -m mmflow.warm NOTEBOOK --model ... --models ...``).

Notebook 6 runs notebooks 1-4's analyses on every model it compares. Those of ``MODEL`` come from the cache that
notebooks 1-4 fill; those of the other models (by default ``shapes-qwen``) would be computed by notebook 6 alone,
after everything else. This computes them into the same cache, with the same declarations, window rule and
parameters (:func:`mmflow.sweep.compute_analyses`), so notebook 6 only reads them. It changes no result: every
entry is keyed by content, and what notebook 6 finds missing it computes itself.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from mmflow.errors import MmflowError


def across_models(notebook: Path, model: str | None, models: str | None) -> list[str]:
    """The models notebook 6 compares in a ``make reproduce`` run (:func:`mmflow.execute.compared_models`, which
    hands them to the notebook), the notebook's own ``models`` default read from its parameters cell where the run
    names none."""
    import papermill as pm

    from mmflow.execute import compared_models

    compared = compared_models(model, models)
    if compared is not None:
        return compared
    return list(ast.literal_eval(pm.inspect_notebook(str(notebook))["models"]["default"]))


def main(argv: list[str] | None = None) -> int:
    """Compute the analyses of every model notebook 6 compares but ``MODEL``; exit status 2 for a bad parameter."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path, help="notebook 6's source (its default models)")
    for name in ("model", "models", "data", "images", "device", "dtype", "n", "cache_dir", "inputs", "keep", "engine"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="")
    args = parser.parse_args(argv)

    import torch

    from mmflow.checkpoints import EMBEDDED_MODEL
    from mmflow.data import load_examples, parse_n
    from mmflow.execute import kernel_threads, parallel_jobs, terminal_progress
    from mmflow.runs import Run
    from mmflow.sweep import compute_analyses

    others = [m for m in across_models(args.notebook, args.model, args.models) if m != (args.model or EMBEDDED_MODEL)]
    threads = kernel_threads(parallel_jobs()).get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        examples = load_examples(args.data or "shapes", args.images or None, n=parse_n(args.n))
        for model in others:
            print(f"== {args.notebook.stem}: {model}'s analyses", flush=True)
            with terminal_progress(label=f"{args.notebook.stem}: {model}" if parallel_jobs() > 1 else None):
                run = Run.load(model, device=args.device or "cpu", dtype=args.dtype or "float32",
                               cache_dir=args.cache_dir or "results", inputs=args.inputs or None)  # fmt: skip
                for _ in compute_analyses(run, examples, args.engine or "fast", args.keep or "correct"):
                    pass
                del run
    except MmflowError as err:
        print(f"make reproduce: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
