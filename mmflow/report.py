"""A browsable HTML report of the executed notebooks: ``make report`` (after ``make reproduce``).

One page per notebook, titled as the notebook, with a link back to the index: code hidden, the parameters used as a
small table, figures inline, no progress bars. It renders the executed notebooks as they are and runs nothing.
Nothing is loaded from the internet (widget state, MathJax, require.js and mermaid script tags are left out: the
explorers' static figures are in the pages).
"""

from __future__ import annotations

import argparse
import ast
import html
import re
import sys
from pathlib import Path

import nbformat

from mmflow.errors import MmflowError
from mmflow.execute import strip_widgets

#: A text progress bar (tqdm's), e.g. ``Loading weights:   0%|          | 0/117``.
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
#: The link back to the index at the top of every page.
INDEX_LINK = '<nav><a href="index.html">&larr; mmflow report: all notebooks</a></nav>'


def parameters_used(book: nbformat.NotebookNode) -> dict[str, object]:
    """The parameters a run used: the ``parameters`` cell's literals, overridden by papermill's injected cell.

    Example:
        >>> cells = [nbformat.v4.new_code_cell("n = None  # all", metadata={"tags": ["parameters"]}),
        ...          nbformat.v4.new_code_cell("n = 2", metadata={"tags": ["injected-parameters"]})]
        >>> parameters_used(nbformat.v4.new_notebook(cells=cells))
        {'n': 2}
    """
    values: dict[str, object] = {}
    for tag in ("parameters", "injected-parameters"):
        for cell in book.cells:
            if cell.cell_type == "code" and tag in cell.get("metadata", {}).get("tags", []):
                for node in ast.parse(cell.source).body:
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                        try:
                            values[node.targets[0].id] = ast.literal_eval(node.value)
                        except ValueError:  # not a plain literal: shown as written
                            values[node.targets[0].id] = ast.unparse(node.value)
    return values


def _parameters_table(values: dict[str, object]) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(repr(v))}</code></td></tr>"
        for k, v in values.items()
    )
    return f'<table class="parameters"><tr><th>parameter</th><th>value used</th></tr>{rows}</table>'


def _for_reading(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as the report shows it: the parameter cells replaced by one table of the values used, and no
    progress bars (stderr streams or text-only outputs that are one)."""
    book = strip_widgets(nbformat.from_dict(book))
    values = parameters_used(book)
    cells, shown = [], False
    for cell in book.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and {"parameters", "injected-parameters"} & set(tags):
            if not shown:
                cells.append(nbformat.v4.new_markdown_cell(_parameters_table(values)))
                shown = True
            continue
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not _is_progress(o)]
        cells.append(cell)
    book.cells = cells
    return book


def _is_progress(output: nbformat.NotebookNode) -> bool:
    if output.get("output_type") == "stream":
        return output.get("name") == "stderr" and bool(PROGRESS_BAR.search(output.get("text", "")))
    data = output.get("data", {})
    return set(data) == {"text/plain"} and bool(PROGRESS_BAR.search(str(data["text/plain"])))


def page(book: nbformat.NotebookNode, title: str = "mmflow") -> str:
    """One notebook as a self-contained HTML page titled ``title``: a link to the index, markdown, the parameters
    used, outputs and figures; no code, no progress bars, no remote scripts."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab", exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    for trait in exporter.trait_names():
        if trait.endswith("_url"):  # MathJax, require.js, widgets, mermaid: all from a CDN by default
            setattr(exporter, trait, "")
    body, _ = exporter.from_notebook_node(_for_reading(book), resources={"metadata": {"name": title}})
    body = re.sub(r'<script[^>]*\bsrc=""[^>]*>\s*</script>', "", body)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + "\n" + INDEX_LINK, body, count=1)


def title_of(book: nbformat.NotebookNode, fallback: str) -> str:
    """The notebook's first heading."""
    for cell in book.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def build_report(executed: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` and one page per executed notebook in ``executed`` (rendered as they are,
    nothing is run); returns the index.

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
        title = title_of(book, source.stem)
        (out / f"{source.stem}.html").write_text(page(book, title), encoding="utf-8")
        entries.append(f'<li><a href="{source.stem}.html">{html.escape(title)}</a></li>')
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
