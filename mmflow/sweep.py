"""Every analysis the notebooks need, split across processes with Hugging Face Accelerate, into the shared results
cache: ``make sweep NPROC=2 [MODEL=... DATA=... IMAGES=...]``, then ``make reproduce`` renders from the cache.

Each process (``accelerate launch``; on CPU the gloo backend) takes shard ``i`` of ``n`` of the examples, on its own
device, and writes one file per example; the files are what a single process would write (tested byte for byte).
The analyses are :data:`mmflow.study.ANALYSES`, the same declaration the notebooks run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from mmflow.errors import MmflowError

#: Environment variables a launcher (``accelerate launch``, ``torchrun``) gives its workers.
LAUNCHED = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")
PR_SET_PDEATHSIG = 1


def die_with_launcher() -> bool:
    """In a worker started by a launcher, on Linux: ask the kernel to send this process SIGTERM when the launcher
    dies (``PR_SET_PDEATHSIG``), so killing ``accelerate launch``, even with SIGKILL, stops its workers instead of
    leaving them computing and writing. Returns whether it was set (not for a plain ``python -m mmflow.sweep``,
    which may outlive its shell, e.g. under nohup)."""
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in LAUNCHED):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the request: it would never come
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def compute_analyses(run, examples, engine: str, keep: str, shard: tuple[int, int] = (0, 1)):
    """Compute (or find in the run's cache) this shard of every analysis the notebooks declare
    (:data:`mmflow.study.ANALYSES`) with the model's default window, as the notebooks do, example by example
    (:meth:`~mmflow.runs.Run.analyses`: each example encoded once and its clean run made once for all its
    knockouts); yields each analysis' name when they are done."""
    from mmflow.paper import default_window
    from mmflow.study import ANALYSES

    run.analyses(examples, list(ANALYSES.values()), default_window(run.n_layers), engine, shard, keep)
    yield from ANALYSES


def main(argv: list[str] | None = None) -> int:
    """Run this process's shard of every analysis; the main process prints what was computed."""
    from accelerate import PartialState

    from mmflow.data import load_examples, parse_n
    from mmflow.params import check_run_params
    from mmflow.runs import Run
    from mmflow.study import ANALYSES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--images", default="")
    parser.add_argument("--n", default="", help="questions per task (empty or 0: the default)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", default="results")
    parser.add_argument("--inputs", default="")
    parser.add_argument("--keep", default="")
    parser.add_argument("--engine", default="", help="fast or naive (empty: fast)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    die_with_launcher()
    try:  # named before the process group starts
        check_run_params(
            args.model, None, args.dtype, args.inputs, args.keep, args.n, None, args.cache_dir, args.engine
        )
    except MmflowError as err:
        print(f"make sweep: {err}", file=sys.stderr)
        return 2
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes, NCCL on GPUs
    torch.set_num_threads(args.threads)
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    shard = (state.process_index, state.num_processes)
    keep = args.keep or "correct"
    try:
        run = Run.load(
            args.model, device=device, dtype=args.dtype, cache_dir=args.cache_dir, inputs=args.inputs or None
        )
        examples = load_examples(args.data, args.images or None, n=parse_n(args.n))
        for name in compute_analyses(run, examples, args.engine or "fast", keep, shard):
            if state.is_main_process:
                print(f"sweep: {name} done on shard 0 of {state.num_processes}", flush=True)
    except MmflowError as err:
        print(f"make sweep: {err}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"sweep: {len(examples)} examples x {len(ANALYSES)} analyses in {state.num_processes} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
