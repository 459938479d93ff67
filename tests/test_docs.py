"""The README is a front page and the docs hold the details: short, the two commands, links that resolve, no
internal issue numbers, and every quoted time with the machine it was measured on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A duration quoted in prose: "68 s", "3 min 30 s", "85 min", "0.3 s".
DURATION = re.compile(r"\b\d+(?:\.\d+)? ?(?:s|min)\b")


def paragraphs(path: Path) -> list[str]:
    """The page's paragraphs, a list with the sentence that introduces it (code blocks left out)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def test_readme_is_a_short_front_page_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert block.startswith("make reproduce") and "\nmake test " in block
    for doc in ("data", "engines", "bench", "reliability", "layout"):
        assert f"(docs/{doc}.md)" in readme
    for figure in (
        "fig1_to_last",
        "fig2_image_to_question",
        "fig3_patch_groups",
        "fig4_answer_casing",
        "fig5_overview",
    ):
        assert f'<img src="figures/{figure}.png"' in readme


def test_links_resolve_and_no_internal_issue_numbers():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"(?<![\w/])#\d+", text), f"{page.name} cites an issue number"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"", text):
            target = next(t for t in target if t)
            if not re.match(r"https?:", target):
                assert (page.parent / target).exists(), f"{page.name}: {target} does not exist"


def test_every_quoted_time_names_its_machine():
    for page in PAGES:
        for paragraph in paragraphs(page):
            if DURATION.search(paragraph) and "|" not in paragraph:
                assert re.search(r"machine|H200|GPU", paragraph), f"{page.name}: {paragraph[:160]!r}"
