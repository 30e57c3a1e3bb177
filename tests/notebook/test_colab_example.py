"""examples/colab.ipynb runs from top to bottom in a real kernel, tiny, with Colab's cells skipped."""

from __future__ import annotations

import nbformat
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "examples" / "colab.ipynb"


def test_the_colab_notebook_trains_continues_and_samples_top_to_bottom(notebook_kernel, tmp_path):
    """Each code cell in order, as a notebook's "run all" sends them, in the session's kernel, in a working
    folder of this test's, with NANORESUME_EXAMPLE_TINY=1 in the kernel's environment (both put back)."""
    setup = notebook_kernel.run(f"import os\n_cwd = os.getcwd()\nos.chdir({str(tmp_path)!r})\n"
                                f"os.environ['NANORESUME_EXAMPLE_TINY'] = '1'")
    assert setup.error is None, setup.output
    outputs = []
    try:
        for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
            if cell.cell_type == "code":
                ran = notebook_kernel.run(cell.source, timeout=300)
                assert ran.error is None, ran.output
                outputs.append(ran.shown_text)
    finally:
        assert notebook_kernel.run("os.chdir(_cwd)\nos.environ.pop('NANORESUME_EXAMPLE_TINY')").error is None
    train, more, sample = outputs[-3:]
    assert "finished: 20 steps" in train and "RunResult(step=20" in train
    assert "resumed from" in more and "step 40, trained 20 steps now" in more
    assert sample.startswith("def ") and len(sample) > 100
    assert (tmp_path / "out-colab-example" / "best.pt").exists()
