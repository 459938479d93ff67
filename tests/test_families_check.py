"""``make families``: every family's replica checked live; the docs' and README's tables agree with the command; a
wrong geometry, wrong rotary positions or an oracle that ignores a sliding window make a row fail."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mmflow import families_check as fc
from mmflow import fast
from mmflow.errors import MmflowError
from mmflow.families import FAMILIES
from mmflow.replicas import REPLICAS, geometry, replica, resolve

ROOT = Path(__file__).resolve().parent.parent
HEADER = "| family | paper inputs |"


@pytest.fixture(scope="module")
def results():
    return fc.run_checks()


def table(text: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with :data:`HEADER`, keyed by the header's cells."""
    rows = []
    for line in text[text.index(HEADER) :].splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    head, body = rows[0], rows[2:]
    return [dict(zip(head, row)) for row in body]


def test_every_family_has_a_replica_and_passes(results):
    assert [r.family for r in REPLICAS] == [r["family"] for r in results]
    assert {r.family for r in REPLICAS} == {f.name for f in FAMILIES}, "register a replica for each family"
    for result in results:
        assert result["ok"], result
        assert result["loads"].startswith("yes") and result["geometry"].startswith("agrees")
        for column, tolerance in fc.TOLERANCE.items():
            if fc.fast_status(result[column]) != "refused":  # a refusal (Gemma 3's fast engine) states its reason
                assert float(re.search(r"\(([-+.e\d]+)\)", result[column]).group(1)) <= tolerance
    markers = {r["family"] for r in results if "image_markers" in r["group_names"]}
    assert markers == {f.name for f in FAMILIES if f.image_markers}  # Qwen, InternVL, Pixtral: their own group
    assert all({"image", "question", "last", "patches"} <= set(r["group_names"]) for r in results)


def test_docs_table_is_the_commands_markdown(results):
    docs = (ROOT / "docs" / "model-families.md").read_text()
    assert table(docs) == table(fc.markdown(results)), "paste `python -m mmflow.families_check --markdown`"


def test_readme_table_agrees_with_the_command(results):
    readme = (ROOT / "README.md").read_text()
    if HEADER not in readme:
        pytest.skip("README has no live families table yet (docs/model-families.md has it)")
    live = {row["family"]: row for row in table(fc.markdown(results))}
    shown = {row["family"]: row for row in table(readme)}
    assert shown.keys() == live.keys()
    for family, row in shown.items():
        assert row["groups"] == live[family]["groups"], family
        assert fc.fast_status(row["fast"]) == fc.fast_status(live[family]["fast"]), family
        assert row["lens"] == live[family]["lens"] and row["naive"] == live[family]["naive"], family


def crop_geometry(size, box):
    """LLaVA-1.5 as the crop processor sees it (shortest edge to the tile, centre crop): not the paper's inputs."""
    width, height = size
    side = geometry.tiny.IMAGE
    new_w, new_h = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    left, top = (new_w - side) // 2, (new_h - side) // 2
    grid = side // geometry.tiny.PATCH

    def transform(x, y):
        return x * new_w / width - left, y * new_h / height - top

    return geometry._overlap_labels(box, transform, grid, grid, geometry.tiny.PATCH)


def test_a_wrong_geometry_fails_the_row(tmp_path, monkeypatch):
    monkeypatch.setattr(geometry, "llava_paper", crop_geometry)
    result = fc.check(replica("llava"), tmp_path)
    assert result["geometry"].startswith("FAILED") and not result["ok"]
    assert result["naive"].startswith("=")  # the other checks still ran


def test_one_d_positions_on_qwen_fail_fast_and_the_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(fast, "position_ids", lambda m, inputs: torch.arange(inputs["input_ids"].shape[1])[None])
    assert fc.main(["--families", "qwen2-vl"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: max |dp|" in out and "families: 0 of 1 pass; failed: ['qwen2-vl']" in out


def test_a_sliding_window_is_refused_by_fast_and_honoured_by_the_oracle(tmp_path, monkeypatch):
    kwargs = {"kind": "llava", "layers": 4, "pad": True, "backbone": "mistral", "sliding_window": 8}
    row = dataclasses.replace(replica("llava"), inputs="processor", kwargs=kwargs)
    result = fc.check(row, tmp_path / "a")
    assert result["ok"] and result["fast"].startswith("refused: The language model attends within a sliding window")
    assert fc.fast_status(result["fast"]) == "refused" and result["naive"].startswith("= oracle")
    monkeypatch.setattr(fc, "_sliding_window", lambda config, layer: None)  # an oracle blind to the window
    assert fc.check(row, tmp_path / "b")["naive"].startswith("FAILED")


def qwen_labels(size, box) -> list[float]:
    """Qwen2-VL's geometry as mmflow's label values (RELATED / OTHER), for a geometry spec kept with the tests."""
    return [fc.RELATED if label == "R" else fc.OTHER for label in geometry.qwen_vl(size, box)]


def qwen_builder(folder, **kwargs):
    """The Qwen replicas' builder, reached through a file of the tests (a builder spec kept with the tests)."""
    from mmflow.replicas.qwen import build_tiny_qwen

    return build_tiny_qwen(folder, **kwargs)


def test_specs_resolve_modules_and_files_or_name_the_culprit():
    from mmflow.replicas import llava

    assert resolve("tests/tiny.py:build_tiny") is llava.build_tiny
    assert resolve("mmflow.replicas.geometry:qwen_vl") is geometry.qwen_vl
    for spec, message in [
        ("mmflow.replicas.geometry", "expected 'module:function'"),
        ("tests/nowhere.py:f", "no file"),
        ("mmflow.nowhere:f", "cannot import"),
        ("mmflow.replicas.geometry:nothing", "has no function 'nothing'"),
    ]:
        with pytest.raises(MmflowError, match=message):
            resolve(spec)
    with pytest.raises(MmflowError, match="No replica of family 'nope'; replicas: llava"):
        fc.main(["--families", "nope"])


def test_a_builder_and_geometry_kept_with_the_tests_can_be_registered(tmp_path):
    """A family's builder and geometry may stay in tests/ (files named relative to the repository root); a geometry
    may return mmflow's label values (:func:`qwen_labels`)."""
    row = dataclasses.replace(
        replica("qwen2-vl"),
        builder="tests/test_families_check.py:qwen_builder",
        geometry="tests/test_families_check.py:qwen_labels",
    )
    result = fc.check(row, tmp_path)
    assert result["ok"] and result["geometry"] == "agrees (4 R / 16 O / 20)"


def test_the_oracles_image_block_is_per_run_and_live(tmp_path):
    """A replica marked bidirectional (Gemma 3's images attend to themselves both ways) gets an oracle whose mask
    holds one block per run of image tokens; on LLaVA, whose image is causal, that oracle disagrees with the model."""
    blocks = fc.image_blocks(6, [1, 2, 4])
    assert blocks[1, 2] and blocks[2, 1] and blocks[4, 4] and int(blocks.sum()) == 5  # {1, 2} both ways, then {4}
    assert not blocks[2, 4] and not blocks[4, 1] and not blocks[0, 0]
    result = fc.check(dataclasses.replace(replica("llava"), bidirectional_image=True), tmp_path)
    assert result["naive"].startswith("FAILED") and result["geometry"].startswith("agrees") and not result["ok"]
