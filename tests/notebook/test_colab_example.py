"""examples/colab.ipynb runs from top to bottom in a real kernel (nbclient), tiny, with Colab's cells skipped."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "examples" / "colab.ipynb"


def test_the_colab_notebook_trains_continues_and_samples_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORESUME_EXAMPLE_TINY", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell's error

    def text(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    outputs = [text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    train, more, sample = outputs[-3:]
    assert "finished: 20 steps" in train and "RunResult(step=20" in train
    assert "resumed from" in more and "step 40, trained 20 steps now" in more
    assert sample.startswith("def ") and len(sample) > 100
    assert (tmp_path / "out-colab-example" / "best.pt").exists()
