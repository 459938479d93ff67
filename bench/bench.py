"""`make bench`: naive vs fast knockout engines side by side, in one process.

Models (random weights, reduced width, the real classes and sequence geometry):

(a) LLaVA-1.5 geometry: 336 px, patch 14, 576 image tokens, 32 layers;
(b) the embedded shapes-llava model;
(c) LLaVA-NeXT anyres geometry: a 640x480 image tiled as LLaVA-NeXT does (2,340 image tokens), 32 layers;
(d) LLaVA-1.5 geometry with 40 layers (as the 13b models);
(e) Qwen2-VL-7B geometry: a 640x480 image resized by smart_resize to 644x476, 23x17 cells of 28 px (391 image
    tokens between <|vision_start|> and <|vision_end|>), M-RoPE, 28 layers, grouped-query attention.

For each: Question->Last, Image->Last, Last->Last and Image->Question with both engines, and one whole example
(4 flows + clean run). On (c) and (d) the naive engine runs a sample of the windows (each is one full forward
of the same cost) and its time is scaled to all windows; agreement is checked on the sampled windows. Then the
peak memory of each engine, the ratio of multiply-accumulates (what the fast engine gains at equal
efficiency), and a last line

    bench: to_last_speedup=<x> image_question_speedup=<x> example_speedup=<x> max_abs_diff=<y>

for model (a) in float32 (targets: >= 100, >= 25, >= 60, <= 1e-5), and the same line for (e) (``bench (e):``).
As on (a), the naive engine runs every window on (e) (unless ``--wide``). ``--device cuda`` runs the same on a GPU
in float32 and float16.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import mmflow_utils as mu

FLOWS = ["Question->Last", "Image->Last", "Last->Last", "Image->Question"]
FAST_REPEAT = 3  # the fast engine's timings: the median of 3 calls (the naive ones are 32+ forwards long)
QUESTION, TAIL = 14, 20  # question tokens, then the tail up to the last position ("... ASSISTANT:")


def _configs(layers: int, image: int, hidden: int, vocab: int) -> dict:
    """The keyword arguments both LLaVA config classes share: a 2-layer CLIP tower and a reduced-width Llama."""
    vision = CLIPVisionConfig(
        image_size=image,
        patch_size=14,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=688 * hidden // 256,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 128),
        num_key_value_heads=max(4, hidden // 128),
        initializer_range=0.05,
        max_position_embeddings=4096,
    )
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": vocab - 1,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def _encoded(vocab: int, image_tokens: int, extra: dict) -> mu.Encoded:
    """BOS + 3 tokens | image tokens | newline | question | tail (last position = the last tail token)."""
    text_ids = torch.randint(3, vocab - 2, (3 + 1 + QUESTION + TAIL,))
    ids = torch.cat([torch.tensor([1]), text_ids[:3], torch.full((image_tokens,), vocab - 1), text_ids[3:]])[None]
    start = 4 + image_tokens + 1
    groups = {
        "image": list(range(4, 4 + image_tokens)),
        "question": list(range(start, start + QUESTION)),
        "last": [ids.shape[1] - 1],
    }
    return mu.Encoded(
        inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}, groups=groups, prompt=""
    )


def llava15_geometry_model(layers: int = 32, hidden: int = 256, vocab: int = 32064, image: int = 336, seed: int = 0):
    """A random LLaVA-1.5-shaped model and an input with its token groups (no tokenizer needed)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(**_configs(layers, image, hidden, vocab))).eval()
    return model, _encoded(vocab, (image // 14) ** 2, {"pixel_values": torch.randn(1, 3, image, image)})


def llava_next_geometry_model(layers: int = 32, hidden: int = 256, vocab: int = 32064, image: int = 336, seed: int = 0):
    """A random LLaVA-NeXT-shaped model (anyres grid of LLaVA-v1.6) and a 640x480 image's input: the base tile
    plus the unpadded 2x2 grid with its newline tokens, as the model's own feature packing counts them."""
    torch.manual_seed(seed)
    pinpoints = [[image * a, image * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = LlavaNextConfig(**_configs(layers, image, hidden, vocab), image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(config).eval()
    sizes = torch.tensor([[480 * image // 336, 640 * image // 336]])
    pixels = torch.randn(1, 5, 3, image, image)
    with torch.inference_mode():
        features = model.model.get_image_features(
            pixels, sizes, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    features = getattr(features, "pooler_output", features)  # (older transformers return the features themselves)
    tokens = len(features[0]) if isinstance(features, (list, tuple)) or features.dim() == 3 else len(features)
    return model, _encoded(vocab, tokens, {"pixel_values": pixels, "image_sizes": sizes})


def smart_resize(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's resize for an image within its pixel bounds: each side to the nearest multiple of 28 px."""
    return round(height / factor) * factor, round(width / factor) * factor


def qwen2_vl_geometry_model(layers: int = 28, hidden: int = 256, size=(640, 480), vocab: int = 152064, seed: int = 0):
    """A random Qwen2-VL-shaped model (7B: 28 layers, 28 heads over 4 key-value heads, M-RoPE sections 16/24/24 of
    each head's 64 frequencies; at reduced width 4 heads over 1, sections 8/12/12) and the input of a ``size`` image:
    one 14 px patch row per pixel_values row, 2x2 patches merged per image token, the image tokens between
    <|vision_start|> and <|vision_end|> as the chat template puts them, M-RoPE positions from the model."""
    torch.manual_seed(seed)
    heads = max(4, hidden // 128)
    head_dim = hidden // heads
    sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    video, start, end, image = vocab - 4, vocab - 3, vocab - 2, vocab - 1
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=18944 * hidden // 3584,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 7),
        max_position_embeddings=32768,
        initializer_range=0.05,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections},
    )
    vision = dict(depth=2, embed_dim=128, hidden_size=hidden, num_heads=4, mlp_ratio=4, patch_size=14)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    height, width = smart_resize(size[1], size[0])
    grid = torch.tensor([[1, height // 14, width // 14]])
    tokens = height * width // 28**2
    text_ids = torch.randint(3, video, (3 + QUESTION + TAIL,))
    ids = torch.cat(
        [torch.tensor([1]), text_ids[:3], torch.tensor([start]), torch.full((tokens,), image), torch.tensor([end])]
        + [text_ids[3:]]
    )[None]
    first = 5
    groups = {
        "image": list(range(first, first + tokens)),
        "image_markers": [first - 1, first + tokens],
        "question": list(range(first + tokens + 1, first + tokens + 1 + QUESTION)),
        "last": [ids.shape[1] - 1],
    }
    types = torch.zeros_like(ids)
    types[0, groups["image"]] = 1
    extra = {"pixel_values": torch.randn(int(grid.prod()), 3 * 2 * 14 * 14), "image_grid_thw": grid}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types, **extra}
    return model, mu.Encoded(inputs=inputs, groups=groups, prompt="")


def build(name: str, quick: bool, wide: bool = False, device: str = "cpu"):
    """Model (a), (c), (d) or (e) with its input, built on ``device``; ``quick``: 4 (or 5) layers and 56 px tiles
    (a 112x84 image on (e)), for the test suite; ``wide``: the language models' real widths (4,096 for (a) and
    (c), 5,120 for (d), 3,584 for (e))."""
    image = 56 if quick else 336
    with torch.device(device):
        if name == "a":
            return llava15_geometry_model(4 if quick else 32, image=image, hidden=4096 if wide else 256)
        if name == "c":
            return llava_next_geometry_model(4 if quick else 32, image=image, hidden=4096 if wide else 256)
        if name == "d":
            return llava15_geometry_model(5 if quick else 40, image=image, hidden=5120 if wide else 256)
        if name == "e":
            size = (112, 84) if quick else (640, 480)
            return qwen2_vl_geometry_model(4 if quick else 28, hidden=3584 if wide else 256, size=size)
    raise ValueError(name)


def to_device(model, encoded: mu.Encoded, device: str, dtype: torch.dtype):
    model = model.to(device=device, dtype=dtype)
    for key, value in encoded.inputs.items():
        if torch.is_tensor(value):
            encoded.inputs[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return model, encoded


def timed(fn, device: str = "cpu", repeat: int = 1):
    """``fn()`` and its wall time, the median of ``repeat`` calls (a short call is at the mercy of a moment's
    noise; a long one averages it); on a GPU after one untimed call (the first pays for memory allocation and
    kernel selection at new shapes), synchronised."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


def compare(title: str, model, encoded, window: int, sample: list[int] | None = None) -> dict[str, float]:
    """Time each flow's sweep with both engines, plus one whole example per engine: one call for the 4 flows,
    which makes the clean run and then 4 x 32 knockout forwards (naive) or the fast engine's passes.

    ``sample``: centre layers the naive engine runs (None: all); its time is scaled to all windows.
    """
    n_layers = mu.num_layers(model)
    scale = 1.0 if sample is None else n_layers / len(sample)
    note = "" if sample is None else f"; naive on {len(sample)} of {n_layers} windows, scaled"
    width = model.config.get_text_config().hidden_size
    print(f"\n== {title}: {n_layers} layers, width {width}, sequence {encoded.length}, window k={window}{note}")
    print(f"{'flow':<18}{'naive s':>9}{'fast s':>9}{'speed-up':>10}{'max|dp|':>11}")
    stats: dict[str, float] = {}
    max_diff, naive_total, device = 0.0, 0.0, model.device.type
    for engine in mu.ENGINES:  # warm up (a GPU's first kernels, the CPU's first allocations): not timed
        mu.knockout_sweep(model, encoded, FLOWS, window, engine, layers=[n_layers // 2])
    for flow in FLOWS:  # the sweeps alone: the clean run is shared by all flows of an example
        with torch.inference_mode():
            clean, cached = mu.clean_run(model, encoded), mu.clean_run(model, encoded, keep_cache=True)
        naive, t_naive = timed(
            lambda f=flow, c=clean: mu.knockout_sweep(model, encoded, [f], window, "naive", layers=sample, clean=c),
            device,
        )
        fast, t_fast = timed(
            lambda f=flow, c=cached: mu.knockout_sweep(model, encoded, [f], window, "fast", clean=c),
            device,
            FAST_REPEAT,
        )
        t_naive *= scale
        naive_total += t_naive
        fast_p = fast.set_index("layer").p_new.loc[naive.layer]
        diff = float(abs(naive.p_new.to_numpy() - fast_p.to_numpy()).max())
        max_diff = max(max_diff, diff)
        stats[flow] = t_naive / t_fast
        print(f"{flow:<18}{t_naive:9.2f}{t_fast:9.3f}{t_naive / t_fast:10.1f}{diff:11.2e}")

    def clean_only():
        with torch.inference_mode():
            mu.clean_run(model, encoded)

    _, t_clean = timed(clean_only, device, FAST_REPEAT)
    t_naive = (
        t_clean + naive_total
        if sample is not None
        else timed(lambda: mu.knockout_sweep(model, encoded, FLOWS, window, "naive"), device)[1]
    )
    _, t_fast = timed(lambda: mu.knockout_sweep(model, encoded, FLOWS, window, "fast"), device, FAST_REPEAT)
    stats["example"] = t_naive / t_fast
    stats["max_abs_diff"] = max_diff
    print(f"{'example (4+clean)':<18}{t_naive:9.2f}{t_fast:9.3f}{t_naive / t_fast:10.1f}")
    return stats


def macs_ratio(model, encoded, window: int) -> dict[str, float]:
    """Multiply-accumulates of the naive engine over the fast one for Image->Question and one whole example: what
    the fast engine gains at equal efficiency (vision tower left out). The fast engine's count follows what it
    computes: each window's suffix from the window's first layer, windows that agree so far sharing one copy, a
    cut row reading only the prefix columns it keeps, the top layer's attention and MLP for the last row only (in
    its clean run too). ``example, causal``: the same with the naive engine's unmasked layers charged only the
    pairs a causal mask keeps (its fused kernel skips some of the others; its window layers, a dense mask, compute
    all) and the fast clean forward likewise."""
    config = model.config.get_text_config()
    n_layers, n = mu.num_layers(model), encoded.length
    per_token = sum(p.numel() for p in mu.decoder_layers(model)[0].parameters())
    top_row = per_token - sum(p.numel() for p in mu.layer_mlp(model, n_layers - 1).parameters())  # not the last
    per_pair = 2 * config.hidden_size  # QK and AV over all heads
    forward = n_layers * n * (per_token + n * per_pair)  # a dense mask: every pair computed
    causal = forward - n_layers * n * (n - 1) // 2 * per_pair  # only the pairs a causal mask keeps
    top_cut = (n - 1) * (per_token - top_row)  # the fast clean forward's top layer: the MLP of the last row only
    windows = [mu.window_layers(c, window, n_layers) for c in range(n_layers)]

    def fast_flow(flow: str) -> float:
        sources, targets = map(set, mu.flow_positions(flow, encoded.groups, n))
        t0 = min(targets)
        s, kept = n - t0, t0 - len({c for c in sources if c < t0})
        total = 0
        for j in range(n_layers):
            copies = {(w.start, tuple(x in w for x in range(w.start, j + 1))) for w in windows if w.start <= j}
            rows = [s - 1] if j == n_layers - 1 else range(s)
            for _, inside in copies:
                pairs = sum((kept if inside[-1] and t0 + r in targets else t0) + r + 1 for r in rows)
                total += (s * per_token if j < n_layers - 1 else (s - 1) * top_row + per_token) + pairs * per_pair
        return total

    image_question = fast_flow("Image->Question")
    suffixes = sum(fast_flow(flow) for flow in FLOWS)
    in_windows = sum(len(w) for w in windows) * n * (n - 1) // 2 * per_pair  # the pairs a dense mask adds
    return {
        "Image->Question": len(windows) * forward / image_question,
        "example": (1 + len(FLOWS) * len(windows)) * forward / (forward - top_cut + suffixes),
        "example, causal": ((1 + len(FLOWS) * len(windows)) * causal + len(FLOWS) * in_windows)
        / (causal - top_cut + suffixes),
    }


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def peak_memory(engine: str, name: str, device: str, quick: bool, wide: bool) -> float:
    """Peak memory (MiB) above the warmed-up model of one engine's sweeps of the four flows (the naive engine: one
    window each, its windows are independent). On a GPU: the allocator's peak, in this process; on the CPU: the
    peak resident size, in a fresh process (a long-lived allocator reuses freed memory and hides peaks)."""
    if device == "cpu":
        command = [sys.executable, __file__, "--memory", engine, "--models", name]
        command += (["--quick"] if quick else []) + (["--wide"] if wide else [])
        return float(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
    return _measure_memory(engine, name, device, quick, wide)


def _measure_memory(engine: str, name: str, device: str, quick: bool, wide: bool) -> float:
    model, encoded = to_device(*build(name, quick, wide, device), device, torch.float32)
    n_layers = mu.num_layers(model)
    with torch.inference_mode():
        mu.clean_run(model, encoded, keep_cache=True)  # warm up: weights touched, first allocations made
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        base = _status_mib("VmRSS")
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    centres = None if engine == "fast" else [n_layers // 2]
    mu.knockout_sweep(model, encoded, FLOWS, mu.default_window(n_layers), engine, layers=centres)
    peak = _status_mib("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return peak - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 and float16)")
    parser.add_argument("--models", default="a,b,c,d,e", help="which models, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny versions of the models (for the test suite)")
    parser.add_argument(
        "--wide", action="store_true", help="the real widths (7b, 13b; for a GPU); the naive engine on 3 windows"
    )
    parser.add_argument("--memory", choices=mu.ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    if args.memory:
        print(_measure_memory(args.memory, names[0], args.device, args.quick, args.wide))
        return
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    dtypes = [torch.float32] if args.device == "cpu" else [torch.float32, torch.float16]
    titles = {
        "a": "(a) random LLaVA-1.5 geometry",
        "c": "(c) random LLaVA-NeXT anyres geometry",
        "d": "(d) random LLaVA-1.5 geometry, 40 layers",
        "e": "(e) random Qwen2-VL-7B geometry, M-RoPE",
    }
    results: dict[tuple[str, torch.dtype], dict[str, float]] = {}
    for dtype in dtypes:
        label = str(dtype).replace("torch.", "")
        for name in names:
            if name == "b":
                run = mu.Run.load(mu.EMBEDDED_MODEL, device=args.device)
                example = mu.load_examples(n=1, tasks=["ChooseAttr"])[0]
                model, encoded = to_device(run.model, run.encode(example), args.device, dtype)
                compare(f"(b) embedded shapes-llava, {label}", model, encoded, mu.default_window(mu.num_layers(model)))
                continue
            model, encoded = to_device(*build(name, args.quick, args.wide, args.device), args.device, dtype)
            n_layers = mu.num_layers(model)
            sample = None if name in ("a", "e") and not args.wide else sorted({0, n_layers // 2, n_layers - 1})
            window = mu.default_window(n_layers)
            results[name, dtype] = compare(f"{titles[name]}, {label}", model, encoded, window, sample)
            if dtype == torch.float32:
                ceiling = macs_ratio(model, encoded, window)
                results[name, dtype]["ceiling"] = ceiling
                print(
                    f"multiply-accumulates, naive / fast: Image->Question {ceiling['Image->Question']:.1f}x, "
                    f"example {ceiling['example']:.1f}x (what the fast engine gains at equal efficiency; "
                    f"{ceiling['example, causal']:.1f}x counting only the pairs a causal mask keeps)"
                )
            del model
    print("\npeak memory above the loaded model, four flows (naive: one window each):")
    for name in (n for n in names if n != "b"):
        memory = {engine: peak_memory(engine, name, args.device, args.quick, args.wide) for engine in mu.ENGINES}
        print(f"  {titles[name]}: " + ", ".join(f"{engine} {mib:.0f} MiB" for engine, mib in memory.items()))
    for name, prefix in (("e", "bench (e)"), ("a", "bench")):  # (a)'s line last: the targets' summary
        if (name, torch.float32) in results:
            stats = results[name, torch.float32]
            to_last = min(stats[f] for f in FLOWS[:3])
            print(
                f"{prefix}: to_last_speedup={to_last:.1f} image_question_speedup={stats['Image->Question']:.1f} "
                f"example_speedup={stats['example']:.1f} max_abs_diff={stats['max_abs_diff']:.2e}"
            )


if __name__ == "__main__":
    main()
