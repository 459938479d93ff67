"""Run real notebooks through one long-lived Jupyter kernel: papermill injects the parameters (as ``make reproduce``
does), nbclient executes every cell. The kernel's imports (torch, transformers, mmflow) are paid once, not once per
notebook; each notebook starts from an empty namespace (``%reset -f``) and no open figure, so it cannot read a
variable an earlier notebook left behind."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill as pm
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: The cell run before each notebook: an empty namespace, no figure left open.
RESET = "%reset -f\nimport matplotlib.pyplot as _plt\n_plt.close('all')\ndel _plt"


class SharedKernel:
    """One python3 kernel, started in ``notebooks/`` (where ``make reproduce`` runs them), for many notebooks."""

    def __init__(self, timeout: int = 600):
        self.timeout, self.km, self.kc = timeout, None, None

    def run(self, name: str, out: Path, **parameters) -> nbformat.NotebookNode:
        """Execute ``notebooks/<name>.ipynb`` with the ``parameters`` it declares (the others are dropped, so one
        set of parameters serves every notebook); write the executed notebook to ``out`` and return it.

        Raises:
            nbclient.exceptions.CellExecutionError: naming the failing cell and its traceback.
        """
        if self.km is None:  # the client does not own it, so it does not shut it down after a notebook
            self.km = AsyncKernelManager(kernel_name="python3")
            run_sync(self.km.start_kernel)(cwd=str(NOTEBOOKS))
        declared = pm.inspect_notebook(NOTEBOOKS / f"{name}.ipynb")
        book = load_notebook_node(str(NOTEBOOKS / f"{name}.ipynb"))  # with papermill's metadata and tags
        book = parameterize_notebook(book, {k: v for k, v in parameters.items() if k in declared})
        book.cells.insert(0, nbformat.v4.new_code_cell(RESET, metadata={"tags": ["reset"]}))
        client = NotebookClient(
            book,
            km=self.km,
            kc=self.kc,
            timeout=self.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        try:
            client.execute()
        finally:
            self.kc = client.kc  # the first client's, kept for the next
            nbformat.write(book, out)
        return book

    def shutdown(self) -> None:
        """Stop the kernel and its channels (if one was started)."""
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None and self.km.has_kernel:
            run_sync(self.km.shutdown_kernel)(now=True)
