"""``make families``: every supported family checked live on its tiny replica (:mod:`mmflow.replicas`), one row each.

Each replica is built from config with a fixed seed, saved like a hub folder in a temporary folder (removed after)
and loaded through mmflow's normal loader, offline. Then, on one picture with the paper's inputs (or the processor's
where the replica says so):

* **loads**: the checkpoint loads as its family;
* **groups**: which token groups are non-empty (``patches``: related and other patches both);
* **geometry**: the patch labels agree with the family's geometry written out independently
  (:mod:`mmflow.replicas.geometry`), and the picture has related and other tokens;
* **naive**: the naive engine's ``p_new`` against an oracle that sets each window layer's attention mask itself
  (forward pre-hooks on the decoder layers, an explicit additive mask), max abs difference;
* **fast**: the fast engine against the naive one (max abs difference), or the reason it refuses;
* **lens**: the logit lens's top layer against the model's own output.

The process exits with status 1 if a check fails. ``--markdown`` prints the table as the README has it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmflow.errors import MmflowError
from mmflow.families import family_of
from mmflow.inputs import encode
from mmflow.knockout import flow_positions, knockout_sweep
from mmflow.lens import logit_lens
from mmflow.models import decoder_layers, load_model, num_layers
from mmflow.paper import FLOWS
from mmflow.patches import NEITHER, OTHER, RELATED, image_token_labels, patch_groups
from mmflow.replicas import REPLICAS, Replica, build, replica, resolve

QUESTION = "Is the circle to the left or to the right of the square?"
WINDOW = 3
TOLERANCE = {"naive": 1e-5, "fast": 1e-5, "lens": 1e-6}
#: The groups the table reports, in its order (related and other patches both present: "patches").
GROUPS = ("image", "image_markers", "question", "last", "patches")
COLUMNS = ("family", "loads", "groups", "geometry", "naive", "fast", "lens")
_LABELS = {RELATED: "R", OTHER: "O", NEITHER: "N"}


def picture(size: tuple[int, int], box: Sequence[float]) -> Image.Image:
    """A dark picture with a red box: the image every check encodes."""
    image = Image.new("RGB", tuple(size), (30, 30, 30))
    x, y, w, h = (round(v) for v in box)
    image.paste((220, 40, 40), (x, y, x + w, y + h))
    return image


def encode_picture(model, processor, size: tuple[int, int], box: Sequence[float], inputs: str = "paper"):
    """:func:`picture` encoded with :data:`QUESTION` (options left / right) and its patch groups: what every check
    (and the family tests) analyse."""
    enc = encode(processor, picture(size, box), QUESTION, ("left", "right"), config=model.config, inputs=inputs)
    enc.groups.update(patch_groups(model, processor, enc.groups["image"], size, [box], inputs))
    return enc


def _sliding_window(config, layer: int) -> int | None:
    """The sliding window layer ``layer`` attends within (None: every earlier position), read from the config as
    transformers does: per layer from ``layer_types`` where the config has them, else ``sliding_window`` unless
    ``use_sliding_window`` is off."""
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer] == "sliding_attention" else None
    return window if getattr(config, "use_sliding_window", True) else None


def image_blocks(n: int, image: Sequence[int]) -> torch.Tensor:
    """(n, n) booleans: True where query and key are image tokens of the same run of consecutive image tokens (one
    run per image or view), the block an image attends to both ways in families like Gemma 3."""
    is_image = torch.zeros(n, dtype=torch.bool)
    is_image[list(image)] = True
    run = torch.cumsum((is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])).int(), 0)
    return is_image[:, None] & is_image[None, :] & (run[:, None] == run[None, :])


def oracle_p(model, enc, answer: int, sources, targets, layers, bidirectional: bool = False) -> float:
    """Probability of ``answer`` when each layer in ``layers`` gets an explicit additive mask (causal minus the cut
    edges) through a forward pre-hook on its decoder layer, every other layer the causal mask (within the layer's
    sliding window, if it has one); no mmflow engine. ``bidirectional``: the causal mask also holds each image's
    block (:func:`image_blocks`), as the model's own mask does for such families."""
    n, config = enc.length, model.config.get_text_config()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if bidirectional:
        causal = causal | image_blocks(n, enc.groups["image"])
    handles = []
    for j, layer in enumerate(decoder_layers(model)):
        window = _sliding_window(config, j)
        allowed = causal if window is None else causal & torch.ones(n, n, dtype=torch.bool).triu(1 - window)
        if j in layers:
            allowed = allowed.clone()
            allowed[torch.tensor(targets)[:, None], torch.tensor(sources)[None, :]] = False
        mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

        def hook(_module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            logits = model(**enc.inputs, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(logits.double().softmax(-1)[answer])


def _groups(groups: dict[str, list[int]]) -> list[str]:
    """The reported groups that are non-empty."""
    present = {name for name, positions in groups.items() if positions}
    if {"related_patches", "other_patches"} <= present:
        present.add("patches")
    return [name for name in GROUPS if name in present]


def _either(want: str, got: str) -> bool:
    """An edge cell ("?") may come out related or other."""
    return want == "?" and got in ("R", "O")


def _geometry(row: Replica, model, processor, enc) -> tuple[bool, str]:
    """Labels against the independent geometry: same count as the image group, each allowed, both kinds present."""
    labels = image_token_labels(model, processor, row.size, [row.box], row.inputs).tolist()
    labels = [_LABELS[float(v)] for v in labels]
    expected = resolve(row.geometry)(row.size, row.box)
    expected = [
        _LABELS[float(v)] if not isinstance(v, str) else v for v in getattr(expected, "tolist", lambda: expected)()
    ]
    if len(labels) != len(expected) or len(labels) != len(enc.groups["image"]):
        return False, f"FAILED: {len(labels)} labels, {len(expected)} expected, {len(enc.groups['image'])} tokens"
    wrong = [i for i, (got, want) in enumerate(zip(labels, expected)) if got != want and not _either(want, got)]
    if wrong or "R" not in labels or "O" not in labels:
        return False, f"FAILED: tokens {wrong[:5]} differ" if wrong else "FAILED: no related or no other token"
    return True, f"agrees ({labels.count('R')} R / {labels.count('O')} O / {len(labels)})"


def _engines(model, enc, flows, bidirectional: bool = False) -> tuple[dict[str, str], dict[str, bool]]:
    """naive vs the oracle, fast vs naive: the cells and whether each passed."""
    naive = knockout_sweep(model, enc, flows, window=WINDOW, engine="naive")
    answer = int(naive.answer_token.iloc[0])
    diffs = []
    for item in naive.itertuples():
        sources, targets = flow_positions(item.flow, enc.groups)
        layers = range(item.window_start, item.window_end + 1)
        diffs.append(abs(item.p_new - oracle_p(model, enc, answer, sources, targets, layers, bidirectional)))
    effect = float(naive.rel_change.abs().max())
    cells = {"naive": f"= oracle ({max(diffs):.0e})"}
    passed = {"naive": max(diffs) <= TOLERANCE["naive"] and effect > 1e-3}
    if not passed["naive"]:
        cells["naive"] = f"FAILED: max |dp| {max(diffs):.1e}, largest effect {effect:.1e}"
    try:
        fast = knockout_sweep(model, enc, flows, window=WINDOW, engine="fast", token_budget=16)
    except MmflowError as err:
        cells["fast"], passed["fast"] = f"refused: {err}", True
    else:
        diff = float((naive.p_new - fast.p_new).abs().max())
        passed["fast"] = diff <= TOLERANCE["fast"] and (naive[["flow", "layer"]] == fast[["flow", "layer"]]).all().all()
        cells["fast"] = f"= naive ({diff:.0e})" if passed["fast"] else f"FAILED: max |dp| {diff:.1e}"
    return cells, passed


def _lens(model, enc) -> tuple[bool, str]:
    """The lens's top layer (with the final norm, and the paper's view) against the model's output."""
    with torch.inference_mode():
        probs = model(**enc.inputs).logits[0, -1].double().softmax(-1)
    top = int(probs.argmax())
    lens = logit_lens(model, enc, {"top": top}, views=("final_norm", "paper"))
    last = lens[lens.layer == num_layers(model) - 1]
    diff = float((last.prob - probs[top].item()).abs().max())
    ok = len(last) == 2 and diff <= TOLERANCE["lens"]
    return ok, f"top = output ({diff:.0e})" if ok else f"FAILED: {diff:.1e}"


def check(row: Replica, root: Path) -> dict[str, Any]:
    """One family's row: build its replica under ``root``, load it, run every check. ``ok``: all passed."""
    out: dict[str, Any] = {"family": row.family, **{c: "-" for c in COLUMNS[1:]}, "ok": False, "group_names": []}
    try:
        torch.manual_seed(0)
        model, processor = load_model(str(build(row, root / row.family)))
        name = family_of(model).name
        out["loads"] = f"yes ({type(model).__name__})" if name == row.family else f"FAILED: loads as {name}"
        enc = encode_picture(model, processor, row.size, row.box, row.inputs)
        out["group_names"] = _groups(enc.groups)
        out["groups"] = ", ".join(out["group_names"])
        geometry_ok, out["geometry"] = _geometry(row, model, processor, enc)
        flows = list(FLOWS) + (["image_markers->last"] if enc.groups.get("image_markers") else [])
        cells, passed = _engines(model, enc, flows, row.bidirectional_image)
        out.update(cells)
        lens_ok, out["lens"] = _lens(model, enc)
        out["ok"] = name == row.family and geometry_ok and all(passed.values()) and lens_ok
    except Exception as err:  # noqa: BLE001 - a family that breaks is a failed row, the others still run
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def run_checks(families: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of ``families`` (default: every replica), each built in a temporary folder removed after."""
    rows = [replica(name) for name in families] if families else list(REPLICAS)
    with tempfile.TemporaryDirectory(prefix="mmflow-families-") as root:
        return [check(row, Path(root)) for row in rows]


def fast_status(cell: str) -> str:
    """A fast cell's status as the README states it: ``exact`` or ``refused``."""
    return "refused" if cell.startswith("refused") else "exact" if cell.startswith("=") else "FAILED"


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """The table as README and docs/model-families.md carry it: statuses, no numbers."""
    lines = [
        "| family | paper inputs | groups | geometry | naive | fast | lens | try |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        row = replica(result["family"])

        def ok(key: str, word: str, result: dict[str, Any] = result) -> str:
            return "FAILED" if result[key].startswith("FAILED") or result[key] == "-" else word

        hub = ", ".join(f"`{hub_id}`" for hub_id in row.hub_ids)
        cells = [
            f"`{row.family}`",
            row.paper_inputs,
            ", ".join(result["group_names"]),
            ok("geometry", "agrees"),
            ok("naive", "= oracle"),
            fast_status(result["fast"]),
            ok("lens", "top = output"),
            hub,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(results: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table, then each failed family's error."""
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines += [f"{r['family']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table; return 1 if a family fails a check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="", help="comma-separated family names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="also print the README's Markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.disable_progress_bar()  # the replicas' "Writing model shards" bars
    results = run_checks([f for f in args.families.split(",") if f] or None)
    print(text_table(results))
    if args.markdown:
        print("\n" + markdown(results))
    failed = [r["family"] for r in results if not r["ok"]]
    print(
        f"\nfamilies: {len(results) - len(failed)} of {len(results)} pass" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
