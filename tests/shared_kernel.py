"""Run real notebooks through one long-lived Jupyter kernel: papermill injects the parameters (as ``make reproduce``
does), nbclient executes every cell. The kernel's imports (torch, transformers, mmflow) are paid once, not once per
notebook; each notebook starts from an empty namespace (``%reset -f``) and no open figure, so it cannot read a
variable an earlier notebook left behind. :class:`Background` runs such a kernel's notebooks while other tests run."""

from __future__ import annotations

import threading
from concurrent.futures import Future
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

    def run(self, name: str | Path, out: Path, **parameters) -> nbformat.NotebookNode:
        """Execute ``notebooks/<name>.ipynb`` (or the notebook file ``name``) with the ``parameters`` it declares (the
        others are dropped, so one set serves every notebook); write the executed notebook to ``out`` and return it.

        Raises:
            nbclient.exceptions.CellExecutionError: naming the failing cell and its traceback.
        """
        if self.km is None:  # the client does not own it, so it does not shut it down after a notebook
            self.km = AsyncKernelManager(kernel_name="python3")
            run_sync(self.km.start_kernel)(cwd=str(NOTEBOOKS))
        source = name if isinstance(name, Path) else NOTEBOOKS / f"{name}.ipynb"
        declared = pm.inspect_notebook(source)
        book = load_notebook_node(str(source))  # with papermill's metadata and tags
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


class Background:
    """Jobs of notebooks run in order by one :class:`SharedKernel` on a background thread (the kernel is another
    process: the CPU it needs is not the test process's), so that other tests run meanwhile on another core.

    ``jobs``: ``{key: [(name, out, parameters), ...]}``; :meth:`wait` returns when a key's notebooks have run, or
    raises what the first failing one raised.
    """

    def __init__(self, jobs: dict):
        self.jobs, self.done = jobs, {key: Future() for key in jobs}
        self.stopped = False
        self.thread = threading.Thread(target=self._work, args=(jobs,), name="notebooks", daemon=True)
        self.thread.start()

    def _work(self, jobs: dict) -> None:
        kernel = SharedKernel()
        try:
            for key, runs in jobs.items():
                try:
                    for name, out, parameters in runs:
                        if self.stopped:
                            raise RuntimeError("stopped before the notebooks ran")
                        kernel.run(name, out, **parameters)
                except BaseException as err:  # noqa: BLE001 - handed to the test that waits for this key
                    self.done[key].set_exception(err)
                else:
                    self.done[key].set_result(None)
        finally:
            kernel.shutdown()

    def wait(self, key, timeout: float = 1800) -> None:
        """Block until ``key``'s notebooks have run; re-raise the error of the one that failed."""
        self.done[key].result(timeout)

    def close(self) -> None:
        """Run no further notebook; wait for the one running and the kernel's shutdown."""
        self.stopped = True
        self.thread.join(120)
