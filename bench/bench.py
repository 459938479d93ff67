"""`make bench`: naive vs fast knockout engines side by side, in one process.

(a) a random model with LLaVA-1.5 geometry (336 px, patch 14, 576 image tokens, 32 layers, reduced width) and
(b) the embedded shapes-llava model, for Question->Last, Image->Last, Last->Last and Image->Question. Prints a
table (time per sweep, speed-up, max |delta p|), each engine's peak memory (fresh process), the bf16 difference between
engines as information, and a last line

    bench: to_last_speedup=<x> image_question_speedup=<x> example_speedup=<x> max_abs_diff=<y>

for model (a) (targets: >= 100, >= 10, >= 25, <= 1e-5).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmflow_utils as mu

FLOWS = ["Question->Last", "Image->Last", "Last->Last", "Image->Question"]


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def peak_memory(engine: str, layers: int) -> float:
    """Peak resident memory (MiB) of one engine's sweeps of the four flows above the warmed-up model, measured in a
    fresh process (the allocator of a long-lived one reuses freed memory and hides peaks)."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-engine", engine, "--layers", str(layers)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _measure_memory(engine: str, layers: int) -> None:
    model, encoded = llava15_geometry_model(layers)
    with torch.inference_mode():
        mu.clean_run(model, encoded, keep_cache=True)  # warm up: weights touched, first allocations made
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    base = _status_mib("VmRSS")
    centres = None if engine == "fast" else [layers // 2]  # naive windows are independent: one has the peak
    mu.knockout_sweep(model, encoded, FLOWS, 9, engine, layers=centres)
    print(_status_mib("VmHWM") - base)


def llava15_geometry_model(layers: int = 32, hidden: int = 256, vocab: int = 32064, seed: int = 0):
    """A random LLaVA-1.5-shaped model and an input with its token groups (no tokenizer needed):
    BOS + 3 tokens | 576 image tokens | newline | 14 question tokens | 20 tail tokens (last = 614)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        initializer_range=0.05,
        max_position_embeddings=1024,
    )
    image_token = vocab - 1
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    text_ids = torch.randint(3, vocab - 2, (3 + 1 + 14 + 20,))
    ids = torch.cat([torch.tensor([1]), text_ids[:3], torch.full((576,), image_token), text_ids[3:]])[None]
    assert ids.shape[1] == 615
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336)}
    groups = {"image": list(range(4, 580)), "question": list(range(581, 595)), "last": [ids.shape[1] - 1]}
    return model, mu.Encoded(inputs=inputs, groups=groups, prompt="")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def compare(name: str, model, encoded, window: int) -> dict[str, float]:
    """Time each flow's sweep with both engines, plus one whole example (4 flows + clean run) per engine."""
    print(f"\n== {name}: {mu.num_layers(model)} layers, sequence {encoded.length}, window k={window}")
    print(f"{'flow':<18}{'naive s':>9}{'fast s':>9}{'speed-up':>10}{'max|dp|':>11}")
    stats: dict[str, float] = {}
    max_diff = 0.0
    for flow in FLOWS:  # the sweeps alone: the clean run is shared by all flows of an example
        with torch.inference_mode():
            clean, cached = mu.clean_run(model, encoded), mu.clean_run(model, encoded, keep_cache=True)
        naive, t_naive = timed(lambda f=flow, c=clean: mu.knockout_sweep(model, encoded, [f], window, "naive", clean=c))
        fast, t_fast = timed(lambda f=flow, c=cached: mu.knockout_sweep(model, encoded, [f], window, "fast", clean=c))
        diff = float((naive.p_new - fast.p_new).abs().max())
        max_diff = max(max_diff, diff)
        stats[flow] = t_naive / t_fast
        print(f"{flow:<18}{t_naive:9.2f}{t_fast:9.3f}{t_naive / t_fast:10.1f}{diff:11.2e}")

    def naive_example():
        with torch.inference_mode():
            mu.clean_run(model, encoded)
        return [mu.knockout_sweep(model, encoded, [flow], window, "naive") for flow in FLOWS]

    _, t_naive = timed(naive_example)
    _, t_fast = timed(lambda: mu.knockout_sweep(model, encoded, FLOWS, window, "fast"))
    stats["example"] = t_naive / t_fast
    stats["max_abs_diff"] = max_diff
    print(f"{'example (4+clean)':<18}{t_naive:9.2f}{t_fast:9.3f}{t_naive / t_fast:10.1f}")
    return stats


def bf16_difference(model, encoded, window: int, layers: list[int]) -> float:
    """Max |delta relative change| (percentage points) between engines in bf16, on a few centre layers."""
    model = model.to(torch.bfloat16)
    encoded.inputs["pixel_values"] = encoded.inputs["pixel_values"].to(torch.bfloat16)
    naive = mu.knockout_sweep(model, encoded, FLOWS, window, "naive", layers=layers)
    fast = mu.knockout_sweep(model, encoded, FLOWS, window, "fast", layers=layers)
    return float((naive.rel_change - fast.rel_change).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="depth of the LLaVA-1.5-geometry model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-engine", choices=mu.ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_engine:
        return _measure_memory(args.memory_engine, args.layers)

    model, encoded = llava15_geometry_model(args.layers)
    a = compare("(a) random LLaVA-1.5 geometry", model, encoded, window=9)

    run = mu.Run.load(mu.EMBEDDED_MODEL)
    example = next(e for e in mu.load_examples(n=1, tasks=["ChooseAttr"]))
    compare("(b) embedded shapes-llava", run.model, run.encode(example), mu.default_window(mu.num_layers(run.model)))

    memory = {engine: peak_memory(engine, args.layers) for engine in mu.ENGINES}
    print(
        "\npeak memory above the loaded model, model (a), four flows: "
        + ", ".join(f"{engine} {mib:.0f} MiB" for engine, mib in memory.items())
    )
    bf16 = bf16_difference(model, encoded, 9, layers=[0, args.layers // 3, args.layers // 2, args.layers - 1])
    print(
        f"\nbf16 (information): max |delta relative change| between engines on model (a) = {bf16:.3f} percentage points"
    )
    to_last = min(a[f] for f in FLOWS[:3])
    print(
        f"bench: to_last_speedup={to_last:.1f} image_question_speedup={a['Image->Question']:.1f} "
        f"example_speedup={a['example']:.1f} max_abs_diff={a['max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
