"""The real-data path on fixtures built like the paper's CSVs: every row accounted for, check-data before a run,
and notebooks that still run when nothing is kept."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from gqa_fixture import build_gqa
from PIL import Image
from test_notebooks import FIGURES, execute

import mmflow_utils as mu
from mmflow.check_data import check_rows, main, summary


@pytest.fixture
def gqa(tmp_path):
    csvs, images, total = build_gqa(tmp_path)
    (images / "choosecat1.jpg").unlink()  # a missing image
    Image.new("RGB", (10, 10)).save(images / "queryattr0.jpg")  # not the size the CSV states
    return csvs, images, total


def test_check_data_reports_every_row(gqa, tiny_dirs, capsys):
    csvs, images, total = gqa
    rows = check_rows(str(tiny_dirs["llava"]), str(csvs), str(images))
    assert len(rows) == total and (~rows.usable).sum() == 2
    reasons = dict(zip(rows.question_id, rows.reason))
    missing = rows[rows.location.str.contains("ChooseCat.csv line 4")].iloc[0]
    assert "not found" in missing.reason and "choosecat1.jpg" in missing.reason
    assert any("the image is (10, 10), the data says (200, 100)" in r for r in reasons.values())
    located = dict(zip(rows.location.str.extract(r"_([A-Za-z]+)\.csv line (\d+)").agg(" ".join, axis=1), rows.objects))
    assert located["ChooseRel 2"] == "skateboard: exact; skateboarder: exact"
    assert located["CompareAttr 2"] == "man: irregular plural; woman: irregular plural"
    assert located["LogicalObj 4"] == "door: plural; window: plural"
    assert located["ChooseRel 6"] == "car: exact"  # a repeated name: one group, no crash
    repeated = rows[rows.location.str.endswith("ChooseRel.csv line 6")].iloc[0]
    assert repeated.usable and repeated.options == "or-slot" and repeated.related > 0
    table = summary(rows)
    assert table.set_index("task").loc["ChooseCat", "options in slot"] == "1/1"
    assert main(["--model", str(tiny_dirs["llava"]), "--data", str(csvs), "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert (
        "ChooseCat.csv line 4 (question_id" in out and f"check-data: {total} rows, {total - 2} usable, 2 skipped" in out
    )
    assert main(["--model", "./no/such", "--data", str(csvs), "--images", str(images)]) == 2


def test_a_run_accounts_for_every_row(gqa, tiny_dirs, tmp_path):
    """N empty (every row), keep='all': each row is analysed or listed with its reason; nothing is fatal."""
    csvs, images, total = gqa
    out = tmp_path / "figures"
    common = dict(
        model=str(tiny_dirs["llava"]),
        data=str(csvs),
        images=str(images),
        out_dir=str(out),
        cache_dir=str(tmp_path / "results"),
    )
    execute("1_to_last_flow", tmp_path / "all.ipynb", keep="all", **common)
    table = pd.read_csv(out / f"{mu.FIG_TO_LAST}_examples.csv")
    assert table.examples.sum() == total and table["not encodable"].sum() == 2
    assert table.kept.sum() == total - 2  # keep="all": every encodable row is analysed
    assert json.loads((out / "manifest.json").read_text())[mu.FIG_TO_LAST]["inputs"] == "paper"


def test_notebooks_run_when_no_example_is_kept(tiny_dirs, tmp_path):
    """A random model answers nothing right: every notebook still runs, says so, and writes its figures."""
    out = tmp_path / "figures"
    for name in FIGURES:
        execute(
            name,
            tmp_path / f"{name}.ipynb",
            model=str(tiny_dirs["llava"]),
            smoke=True,
            out_dir=str(out),
            cache_dir=str(tmp_path / "results"),
            tasks=["ChooseAttr", "QueryAttr"],
        )
    text = (tmp_path / "1_to_last_flow.ipynb").read_text()
    assert "No kept examples" in text
    for figure in [f for figures in FIGURES.values() for f in figures if f != mu.FIG_PATCH_EXAMPLE]:
        assert (out / f"{figure}.png").stat().st_size > 0
    assert set(pd.read_csv(out / "verdicts.csv").verdict) == {"not computed"}
