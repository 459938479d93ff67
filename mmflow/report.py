"""A browsable HTML report of the executed notebooks: ``make report`` (after ``make reproduce``).

One page per notebook (code hidden, figures inline) and an index; nothing is loaded from the internet (widget
state, MathJax, require.js and mermaid script tags are left out: the explorers' static figures are in the pages).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

import nbformat

from mmflow.errors import MmflowError
from mmflow.execute import strip_widgets


def page(book: nbformat.NotebookNode) -> str:
    """One notebook as a self-contained HTML page: markdown, outputs and figures, no code, no remote scripts."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab", exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    for trait in exporter.trait_names():
        if trait.endswith("_url"):  # MathJax, require.js, widgets, mermaid: all from a CDN by default
            setattr(exporter, trait, "")
    body, _ = exporter.from_notebook_node(strip_widgets(book))
    return re.sub(r'<script[^>]*\bsrc=""[^>]*>\s*</script>', "", body)


def title_of(book: nbformat.NotebookNode, fallback: str) -> str:
    """The notebook's first heading."""
    for cell in book.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def build_report(executed: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` and one page per executed notebook in ``executed``; returns the index.

    Raises:
        MmflowError: if ``executed`` holds no executed notebook (run ``make reproduce`` first).
    """
    sources = sorted(Path(executed).glob("[0-9]*_*.ipynb"))
    if not sources:
        raise MmflowError(f"No executed notebooks in {executed}: run `make reproduce` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for source in sources:
        book = nbformat.read(source, as_version=4)
        (out / f"{source.stem}.html").write_text(page(book), encoding="utf-8")
        entries.append(f'<li><a href="{source.stem}.html">{html.escape(title_of(book, source.stem))}</a></li>')
    index = out / "index.html"
    index.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>mmflow report</title></head>\n<body>\n"
        "<h1>mmflow: cross-modal information flow, the executed notebooks</h1>\n"
        f"<ol>\n{chr(10).join(entries)}\n</ol>\n</body></html>\n",
        encoding="utf-8",
    )
    return index


def main(argv: list[str] | None = None) -> int:
    """``python -m mmflow.report EXECUTED OUT``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("executed", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        index = build_report(args.executed, args.out)
    except MmflowError as err:
        print(f"make report: {err}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
