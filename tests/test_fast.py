"""The fast engine: layer skipping and suffix copies agree with the paper's method on every supported backbone,
in any window order and pass size; its token budget and its guard."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from test_knockout import ALL_FLOWS, encoded_example

import mmflow_utils as mu
from mmflow import budget, fast
from mmflow.cache import TOKEN_BUDGET_ENV

REPO = Path(__file__).resolve().parent.parent


def assert_engines_agree(model, enc, **kwargs):
    """Every flow of the test suite, plus one whose source columns are scattered (every other image token)."""
    flows = ALL_FLOWS + [(enc.groups["image"][::2], enc.groups["question"])]
    naive = mu.knockout_sweep(
        model, enc, flows, engine="naive", **{k: v for k, v in kwargs.items() if k != "token_budget"}
    )
    fasts = mu.knockout_sweep(model, enc, flows, engine="fast", **kwargs)
    assert naive[["flow", "layer", "window_start", "window_end"]].equals(
        fasts[["flow", "layer", "window_start", "window_end"]]
    )
    assert (naive.p_new - fasts.p_new).abs().max() <= 1e-5
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3  # the cuts do something
    return fasts, flows


@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])
def test_fast_equals_naive_on_other_backbones(tmp_path, backbone):
    """LLaVA checkpoints come with Llama (1.5, Vicuna, Llama-3), Mistral (1.6) and Qwen2 language models."""
    folder = tiny.build_tiny(tmp_path / backbone, "llava", backbone=backbone, num_key_value_heads=2)
    model, processor = mu.load_model(str(folder))
    assert type(mu.text_model(model)).__name__.lower().startswith(backbone)
    assert_engines_agree(model, encoded_example(model, processor), window=3)


def test_sliding_window_longer_than_the_input_is_refused(tmp_path):
    """Mistral-style sliding-window attention: the fast engine's attention sees every earlier position, so an input
    longer than the window is refused with a clear error (the naive engine, the model's own masks, still runs)."""
    folder = tiny.build_tiny(tmp_path / "sliding", "llava", backbone="mistral", sliding_window=8)
    model, processor = mu.load_model(str(folder))
    enc = encoded_example(model, processor)
    assert enc.length > 8
    with pytest.raises(mu.MmflowError, match="sliding window of 8 positions.*engine='naive'"):
        mu.knockout_sweep(model, enc, ["Image->Last"], window=3, engine="fast")
    assert len(mu.knockout_sweep(model, enc, ["Image->Last"], window=3, engine="naive")) == mu.num_layers(model)


def test_any_window_order_and_pass_size(loaded):
    model, processor = loaded("llava_next_gqa")
    enc = encoded_example(model, processor)
    centres = [5, 0, 3, 3, 1]  # unsorted, repeated: copies enter at their own first layer whatever the order
    reference, flows = assert_engines_agree(model, enc, window=3, layers=centres)
    assert reference.groupby("flow").layer.apply(list).map(lambda layers: layers == sorted(centres)).all()
    for tokens in (1, 7, 10_000):  # one copy per pass, a few, all in one pass
        again = mu.knockout_sweep(model, enc, flows, window=3, layers=centres, token_budget=tokens)
        assert len(again) == len(reference) and (again.p_new - reference.p_new).abs().max() <= 1e-6


def test_without_the_fused_cpu_kernel(loaded, monkeypatch):
    """The plain matrix-product attention (what runs on a GPU, or where PyTorch lacks the fused CPU kernel) gives
    the same results, edge windows shared and split included."""
    model, processor = loaded("llava_next_gqa")
    monkeypatch.setattr(fast, "_CPU_FLASH", None)
    assert_engines_agree(model, encoded_example(model, processor), window=3, layers=[0, 1, 2, 5, 5])


def test_exact_in_float64(loaded):
    """In float64 the engines agree to rounding (1e-12): the fast engine's reuse is exact, not approximately so;
    its attention runs in the model's dtype when that is wider than float32."""
    model, processor = loaded("llava_next_gqa")
    model = copy.deepcopy(model).to(torch.float64)
    enc = encoded_example(model, processor)
    enc.inputs["pixel_values"] = enc.inputs["pixel_values"].to(torch.float64)
    flows = ALL_FLOWS + [(enc.groups["image"][::2], enc.groups["question"])]
    naive = mu.knockout_sweep(model, enc, flows, window=3, engine="naive")
    fasts = mu.knockout_sweep(model, enc, flows, window=3, engine="fast")
    assert (naive.p_new - fasts.p_new).abs().max() <= 1e-12
    assert (naive.p_base - fasts.p_base).abs().max() <= 1e-12  # its clean run's top layer: the last row only
    assert naive.rel_change.abs().max() > 1e-3


def test_rows_only_leaves_no_hook_behind(loaded):
    """The top layer's MLP runs on the last rows only through hooks that are gone after a sweep, and after an
    error inside the block."""
    model, processor = loaded("llava")
    mlp = mu.layer_mlp(model, mu.num_layers(model) - 1)
    with pytest.raises(RuntimeError, match="inside"), fast.rows_only(mlp, torch.tensor([0])):
        raise RuntimeError("inside")
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks
    mu.knockout_sweep(model, encoded_example(model, processor), ["Image->Question"], window=3)
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu(loaded, dtype):
    """`make ... DTYPE=bfloat16|float16` on a CPU: the fused kernel and the log-sum-exp join run in half precision
    and agree with the naive engine within its rounding (a few percent of p)."""
    model, processor = loaded("llava_next_gqa")
    model = copy.deepcopy(model).to(dtype)
    enc = encoded_example(model, processor)
    enc.inputs["pixel_values"] = enc.inputs["pixel_values"].to(dtype)
    naive = mu.knockout_sweep(model, enc, ALL_FLOWS, window=3, engine="naive")
    fasts = mu.knockout_sweep(model, enc, ALL_FLOWS, window=3, engine="fast")
    assert ((naive.p_new - fasts.p_new).abs() <= 0.05 * naive.p_base).all()


@pytest.mark.parametrize("fused", [True, False])
def test_attention_over_blocks_joins_by_log_sum_exp(monkeypatch, fused):
    """Attention over several key blocks equals one softmax over their concatenation (and its log-sum-exp)."""
    if not fused:
        monkeypatch.setattr(fast, "_CPU_FLASH", None)
    torch.manual_seed(0)
    query = torch.randn(1, 2, 5, 8)
    blocks = [(torch.randn(1, 2, c, 8), torch.randn(1, 2, c, 8)) for c in (3, 1, 6)]
    keys, values = (torch.cat(parts, 2) for parts in zip(*blocks))
    scores = query @ keys.transpose(-1, -2) * 0.3
    out, lse = fast._attention_lse(query, blocks, 0.3)
    assert torch.allclose(out, torch.softmax(scores, -1) @ values, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-6)


def test_budget_from_free_memory_and_override(loaded, monkeypatch):
    model, _ = loaded("llava")
    monkeypatch.delenv(TOKEN_BUDGET_ENV, raising=False)
    roomy = budget.device_token_budget(model, prefix=600)
    assert roomy & (roomy - 1) == 0 and 1 <= roomy <= 8192  # a power of two, capped
    pages = {"SC_AVPHYS_PAGES": 16, "SC_PAGE_SIZE": 4096}  # 64 KiB free
    monkeypatch.setattr(budget.os, "sysconf", lambda name: pages[name])
    tight = budget.device_token_budget(model, prefix=600)
    assert tight == 1 < roomy  # float32 scores of one token over 600 keys already exceed a quarter of it
    assert budget.token_budget_for(model, 600, None) == tight
    monkeypatch.setenv(TOKEN_BUDGET_ENV, "48")
    assert budget.token_budget_for(model, 600, None) == 48 and budget.token_budget_for(model, 600, 5) == 5
    monkeypatch.setenv(TOKEN_BUDGET_ENV, "lots")
    with pytest.raises(mu.MmflowError, match="MMFLOW_TOKEN_BUDGET must be a positive integer"):
        budget.token_budget_for(model, 600, None)
    with pytest.raises(mu.MmflowError, match="token_budget must be a positive integer"):
        budget.token_budget_for(model, 600, 2.5)


def test_fast_engine_refuses_to_run_outside_the_knockout_attention(loaded):
    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        clean = mu.clean_run(model, enc, keep_cache=True)
        flows = [mu.flow_positions("Image->Last", enc.groups, enc.length)]
        with pytest.raises(mu.MmflowError, match="only inside knockout_attention"):
            mu.ENGINES["fast"].sweep(model, enc, clean, "sdpa", flows, [range(0, 2)], None)


def test_bench_runs_and_its_engines_agree():
    """`make bench` on tiny versions of models (a) and (c): the table, the multiply-accumulate ratio, memory and
    the summary line are printed, and the engines agree within 1e-5."""
    out = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--models", "a,c"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "(c) random LLaVA-NeXT anyres geometry" in out and "naive on 3 of 4 windows, scaled" in out
    assert "multiply-accumulates, naive / fast" in out and "peak memory above the loaded model" in out
    summary = dict(item.split("=") for item in out.strip().splitlines()[-1].removeprefix("bench: ").split())
    assert set(summary) == {"to_last_speedup", "image_question_speedup", "example_speedup", "max_abs_diff"}
    assert float(summary["max_abs_diff"]) <= 1e-5


def test_a_bad_token_budget_stops_make_before_anything_is_written(tmp_path):
    """`make reproduce TOKEN_BUDGET=lots`: the command names the variable and writes no executed copy."""
    import os

    executed = tmp_path / "out" / "nb.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "mmflow.execute", str(REPO / "notebooks" / "1_to_last_flow.ipynb"), str(executed)],
        cwd=REPO,
        env={**os.environ, TOKEN_BUDGET_ENV: "lots"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "MMFLOW_TOKEN_BUDGET must be a positive integer" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bench_model_e_has_qwen2_vl_7b_geometry():
    """Bench model (e): a 640x480 image is 391 image tokens (smart_resize to 644x476: 23 x 17 cells of 28 px) between
    the vision markers, and the model's M-RoPE moves the text after it by the image's side (23), not its 391
    tokens; both engines agree on the quick version, which `bench.py --quick --models e` reports."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench
    from mmflow.models import position_ids

    model, enc = bench.qwen2_vl_geometry_model(layers=1, vocab=1000)
    assert len(enc.groups["image"]) == 391 and enc.inputs["image_grid_thw"].tolist() == [[1, 34, 46]]
    assert enc.inputs["pixel_values"].shape == (34 * 46, 3 * 2 * 14 * 14)
    assert enc.groups["image_markers"] == [enc.groups["image"][0] - 1, enc.groups["image"][-1] + 1]
    config = model.config.get_text_config()
    assert config.rope_parameters["mrope_section"] == [8, 12, 12] and config.num_key_value_heads == 1
    rope = position_ids(model, enc.inputs)
    assert rope.shape == (3, enc.length) and int(rope[0, -1]) == enc.length - 1 - 391 + 23
    out = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--models", "e"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "(e) random Qwen2-VL-7B geometry, M-RoPE, float32: 4 layers" in out
    summary = dict(item.split("=") for item in out.strip().splitlines()[-1].removeprefix("bench (e): ").split())
    assert float(summary["max_abs_diff"]) <= 1e-5
