"""examples/colab.ipynb runs from top to bottom in a real kernel (nbclient, as Jupyter's "run all" does),
tiny, with Colab's cells skipped."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "examples" / "colab.ipynb"


def test_the_colab_notebook_trains_continues_and_samples_top_to_bottom(notebook_kernel, tmp_path):
    """nbclient runs every code cell in order in the session's kernel (it leaves a kernel it did not start
    running), in a working folder of this test's, with NANORESUME_EXAMPLE_TINY=1 in the kernel's environment
    (both put back)."""
    setup = notebook_kernel.run(f"import os\n_cwd = os.getcwd()\nos.chdir({str(tmp_path)!r})\n"
                                f"os.environ['NANORESUME_EXAMPLE_TINY'] = '1'")
    assert setup.error is None, setup.output
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    try:
        NotebookClient(notebook, km=notebook_kernel.manager, timeout=300).execute()  # raises on a cell's error
    finally:
        assert notebook_kernel.run("os.chdir(_cwd)\nos.environ.pop('NANORESUME_EXAMPLE_TINY')").error is None

    def text(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    outputs = [text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    train, more, sample = outputs[-3:]
    assert "finished: 20 steps" in train and "RunResult(step=20" in train
    assert "resumed from" in more and "step 40, trained 20 steps now" in more
    assert sample.startswith("def ") and len(sample) > 100
    assert (tmp_path / "out-colab-example" / "best.pt").exists()
