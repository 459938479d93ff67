"""Attention knockout (fast vs naive, hand-computed cases, pitfalls) and the logit lens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmflow_utils as mu

QUESTION = "Is the circle to the left or to the right of the square?"
ALL_FLOWS = list(mu.FLOWS) + ["true_option->last", "image->true_option", "object:square->last"]


def encoded_example(model, processor, size=(90, 60)):
    image = Image.new("RGB", size, (30, 30, 30))
    image.paste((220, 40, 40), (10, 10, 40, 35))
    enc = mu.encode(processor, image, QUESTION, options=("left", "right"), objects=["circle", "square"])
    enc.groups.update(mu.patch_groups(model, processor, enc.groups["image"], size, [(10, 10, 30, 25)]))
    return enc


@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_next_sp", "llava_next_gqa"])
@pytest.mark.parametrize("window,budget", [(3, 16), (9, 256)])
def test_fast_equals_naive(loaded, name, window, budget):
    model, processor = loaded(name)
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, ALL_FLOWS, window=window, engine="naive")
    fast = mu.knockout_sweep(model, enc, ALL_FLOWS, window=window, engine="fast", token_budget=budget)
    assert len(naive) == len(ALL_FLOWS) * mu.num_layers(model)
    assert (
        (
            naive[["flow", "layer", "window_start", "window_end"]]
            == fast[["flow", "layer", "window_start", "window_end"]]
        )
        .all()
        .all()
    )
    assert (naive.p_new - fast.p_new).abs().max() <= 1e-5
    assert (naive.p_base - fast.p_base).abs().max() <= 1e-6
    # the knockouts do something, so the agreement is meaningful (pitfall: a mask arriving as None)
    assert naive.groupby("flow").rel_change.apply(lambda r: r.abs().max()).min() > 1e-3


def test_fast_equals_naive_eager(tiny_dirs):
    model, processor = mu.load_model(str(tiny_dirs["llava"]))
    model.set_attn_implementation("eager")
    enc = encoded_example(model, processor)
    naive = mu.knockout_sweep(model, enc, ALL_FLOWS, window=3, engine="naive")
    fast = mu.knockout_sweep(model, enc, ALL_FLOWS, window=3, engine="fast", token_budget=16)
    assert (naive.p_new - fast.p_new).abs().max() <= 1e-5
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("engine", mu.ENGINES)
def test_empty_knockout_reproduces_clean(loaded, engine):
    """An empty window (no layer cut) through each engine, and an empty Knockout through the primitive."""
    from mmflow.engines import ENGINES, knockout_attention

    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        clean_probs = model(**enc.inputs).logits[0, -1].softmax(-1)
        with knockout_attention(model) as base:
            clean = mu.clean_run(model, enc, keep_cache=ENGINES[engine].needs_cache)
            flows = [mu.flow_positions(flow, enc.groups) for flow in mu.FLOWS if flow not in mu.PATCH_FLOWS]
            p_new = ENGINES[engine].sweep(model, enc, clean, base, flows, [range(0)], 256)
            assert len(p_new) == len(flows) and all(abs(p[0] - clean.p_base) < 1e-7 for p in p_new)
            empty = model(**enc.inputs, knockout=mu.Knockout({})).logits[0, -1].softmax(-1)
    assert abs(clean_probs.max().item() - clean.p_base) < 1e-6
    assert torch.allclose(empty, clean_probs, atol=1e-7, rtol=0)


def test_bad_sweep_parameters_are_named(loaded):
    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    for window in (0, -1, 2.5, True):
        with pytest.raises(mu.MmflowError, match="window must be a positive integer"):
            mu.knockout_sweep(model, enc, ["Image->Last"], window=window)
    with pytest.raises(mu.MmflowError, match=r"layers must lie in 0\.\."):
        mu.knockout_sweep(model, enc, ["Image->Last"], window=3, layers=[99])
    with pytest.raises(mu.MmflowError, match=r"layers must lie in"):
        mu.knockout_sweep(model, enc, ["Image->Last"], window=3, layers=[-1])
    with pytest.raises(mu.MmflowError, match="flows must be a non-empty list"):
        mu.knockout_sweep(model, enc, [], window=3)


def test_one_off_knockout_primitive(loaded):
    """The two-line call-site intervention equals the sweep's value for the same window."""
    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    sources, targets = mu.flow_positions("Question->Last", enc.groups)
    layers = mu.window_layers(1, 3, mu.num_layers(model))
    cut = mu.block_mask([(targets, sources)], enc.length, enc.length)
    with torch.inference_mode(), mu.knockout_attention(model):
        clean = model(**enc.inputs).logits[0, -1].softmax(-1)
        out = model(**enc.inputs, knockout=mu.Knockout({j: cut for j in layers})).logits[0, -1].softmax(-1)
    answer = int(clean.argmax())
    swept = mu.knockout_sweep(model, enc, ["Question->Last"], window=3, layers=[1])
    assert abs(out[answer].item() - swept.p_new.iloc[0]) < 1e-6


def last_position_by_hand(model, embeds: torch.Tensor) -> torch.Tensor:
    """Output distribution at the last position when it attends only to itself in every layer, computed by hand:
    attention to one key is weight 1 on its value, whatever the rotary position, so each layer adds
    o_proj(v_proj(norm(h))) and then the MLP."""
    h = embeds[0, -1]
    for layer in mu.decoder_layers(model):
        attn = layer.self_attn
        h = h + attn.o_proj(attn.v_proj(layer.input_layernorm(h)))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(mu.text_model(model).norm(h)).softmax(-1)


@pytest.mark.parametrize("name", ["llava", "llava_next"])
@pytest.mark.parametrize("engine", mu.ENGINES)
def test_blocking_everything_the_last_position_sees(loaded, name, engine):
    model, processor = loaded(name)
    enc = encoded_example(model, processor)
    n, n_layers = enc.length, mu.num_layers(model)
    result = mu.knockout_sweep(model, enc, [(list(range(n - 1)), [n - 1])], window=2 * n_layers + 1, engine=engine)
    assert (result.window_start == 0).all() and (result.window_end == n_layers - 1).all()
    with torch.inference_mode():
        embeds = model(**enc.inputs, output_hidden_states=True).hidden_states[0]
        expected = last_position_by_hand(model, embeds)[result.answer_token.iloc[0]].item()
    assert result.p_new.sub(expected).abs().max() < 1e-6
    assert abs(result.rel_change.iloc[0]) > 1.0


def test_window_is_centred_and_truncated():
    assert list(mu.window_layers(0, 9, 32)) == [0, 1, 2, 3, 4]
    assert list(mu.window_layers(10, 9, 32)) == list(range(6, 15))
    assert list(mu.window_layers(31, 9, 32)) == list(range(27, 32))
    assert list(mu.window_layers(5, 4, 32)) == [3, 4, 5, 6]


def test_bad_flows_are_refused(loaded):
    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    with pytest.raises(mu.MmflowError, match="Unknown flow 'Image to Last'"):
        mu.knockout_sweep(model, enc, ["Image to Last"])
    with pytest.raises(mu.MmflowError, match="Unknown group 'answer'"):
        mu.knockout_sweep(model, enc, ["answer->last"])
    with pytest.raises(mu.MmflowError, match="block every key of position 3"):
        mu.knockout_sweep(model, enc, [([0, 1, 2, 3], [3])])
    with pytest.raises(mu.MmflowError, match="Unknown engine 'turbo'"):
        mu.knockout_sweep(model, enc, ["Image->Last"], engine="turbo")


def test_attention_is_restored_also_on_error(loaded):
    model, processor = loaded("llava")
    text_cfg, vision_cfg = model.config.get_text_config(), model.config.vision_config
    before = (text_cfg._attn_implementation, vision_cfg._attn_implementation)
    with pytest.raises(RuntimeError, match="boom"), mu.knockout_attention(model):
        assert text_cfg._attn_implementation.startswith("mmflow_knockout")
        assert vision_cfg._attn_implementation == before[1]  # the vision tower is never touched
        raise RuntimeError("boom")
    assert (text_cfg._attn_implementation, vision_cfg._attn_implementation) == before


def test_sweeps_are_repeatable_and_leave_no_graph(loaded):
    model, processor = loaded("llava_next")
    enc = encoded_example(model, processor)
    first = mu.knockout_sweep(model, enc, ["Image->Question", "Image->Last"], window=3)
    second = mu.knockout_sweep(model, enc, ["Image->Question", "Image->Last"], window=3)
    assert first.equals(second)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_logit_lens_views(loaded, name):
    """final_norm: normed layer outputs (the top one is the output); raw: un-normed; paper: hidden_states as the
    official code reads them (embeddings at -1, raw layers, normed top), checked against the model's own outputs."""
    model, processor = loaded(name)
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        out = model(**enc.inputs, output_hidden_states=True)
    probs = out.logits[0, -1].softmax(-1)
    tokens = {"top": int(probs.argmax()), "other": 7}
    lens = mu.logit_lens(model, enc, tokens, views=tuple(mu.LENS_VIEWS))
    n = mu.num_layers(model)
    view = {label: part.pivot(index="layer", columns="token", values="prob") for label, part in lens.groupby("view")}
    assert list(view[mu.WITH_NORM].index) == list(range(n)) == list(view[mu.RAW].index)
    assert list(view[mu.PAPER_VIEW].index) == list(range(-1, n))
    for label in (mu.WITH_NORM, mu.PAPER_VIEW):  # both end at the model's output distribution
        assert abs(view[label].loc[n - 1, "top"] - probs[tokens["top"]].item()) < 1e-6
    head, norm = model.get_output_embeddings(), mu.text_model(model).norm
    with torch.inference_mode():
        for layer in range(-1, n - 1):  # hidden_states[layer + 1] is the raw output of `layer` (-1: embeddings)
            h = out.hidden_states[layer + 1][:, -1]
            raw, normed = head(h)[0].softmax(-1), head(norm(h))[0].softmax(-1)
            assert abs(view[mu.PAPER_VIEW].loc[layer, "other"] - raw[7].item()) < 1e-6
            if layer >= 0:
                assert abs(view[mu.RAW].loc[layer, "other"] - raw[7].item()) < 1e-6
                assert abs(view[mu.WITH_NORM].loc[layer, "other"] - normed[7].item()) < 1e-6
    assert (view[mu.RAW] - view[mu.WITH_NORM]).abs().max().max() > 1e-4
    with pytest.raises(mu.MmflowError, match="views must be some of"):
        mu.logit_lens(model, enc, tokens, views=["logits"])


def test_answer_token_ids_on_real_tokenizers(loaded):
    for name in ("llava", "llava_sp"):
        _, processor = loaded(name)
        ids = mu.answer_token_ids(processor.tokenizer, "Left")
        tok = processor.tokenizer
        assert tok.decode([ids["lowercase"]]).strip() == "left" and tok.decode([ids["Capitalized"]]).strip() == "Left"


def test_reused_clean_run_serves_every_flow_in_any_order(loaded):
    model, processor = loaded("llava")
    enc = encoded_example(model, processor)
    with torch.inference_mode():
        clean = mu.clean_run(model, enc, keep_cache=True)
    for flow in ("Image->Question", "Image->Last", "Image->Question"):  # the clean cache is read, never cut
        reused = mu.knockout_sweep(model, enc, [flow], window=3, clean=clean)
        assert reused.equals(mu.knockout_sweep(model, enc, [flow], window=3))
    with torch.inference_mode():
        late = mu.clean_run(model, enc, keep_cache=True, keep_from=enc.length - 1)
    with pytest.raises(mu.MmflowError, match="keeps hidden states from position"):
        mu.knockout_sweep(model, enc, ["Image->Question"], window=3, clean=late)
    with pytest.raises(mu.MmflowError, match="token_budget"):
        mu.knockout_sweep(model, enc, ["Image->Last"], window=3, token_budget=0)
