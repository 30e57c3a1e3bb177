"""In a real Jupyter kernel (ipykernel): a run's progress bar is one widget (or one line of text) in the
cell's output, not a line per step, and the evaluation lines and samples are printed there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_FLAGS, cli_flags

pytestmark = pytest.mark.slow
pytest.importorskip("ipykernel")

STEPS, EVAL_INTERVAL = 60, 30
WIDGET = "application/vnd.jupyter.widget-view+json"

# The Python API as a notebook uses it today; log_interval 1 would print a line per step without a bar.
CELL = """\
import sys
sys.path.insert(0, {repo!r})
from nanoresume.config import parse_command_line
from nanoresume.trainer import Trainer

cfg, given = parse_command_line({args!r})
result = Trainer(cfg, explicit=given).run()
print("run returned at step", result.step)
"""


def shown(text: str) -> list[str]:
    """The lines a notebook shows for stream text: a carriage return redraws its line."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def test_a_run_in_a_notebook_cell_shows_one_bar_and_prints_its_evaluations_and_samples(notebook_kernel,
                                                                                        tiny_text: Path,
                                                                                        tmp_path: Path):
    args = cli_flags(dict(TINY_FLAGS, data=str(tiny_text), out_dir=str(tmp_path / "out"),
                          cache_dir=str(tmp_path / "cache"), max_steps=STEPS, eval_interval=EVAL_INTERVAL,
                          log_interval=1, sample_tokens=8))  # no --progress: the kernel decides
    cell = notebook_kernel.run(CELL.format(repo=str(REPO), args=args), timeout=300)
    assert cell.error is None, cell.output
    stdout, stderr = shown(cell.stdout), cell.stderr
    widgets = [data for data in cell.displays if WIDGET in data]
    try:
        import ipywidgets  # noqa: F401
        assert len(widgets) == 1, cell.displays  # tqdm.auto's widget, updated in place
    except ImportError:
        assert len(shown(stderr)) <= 3 and re.search(rf"{STEPS}/{STEPS} \[", stderr), stderr  # tqdm's text bar
    assert stdout[-1] == f"run returned at step {STEPS}"
    for step in range(0, STEPS + 1, EVAL_INTERVAL):
        evaluation = next(i for i, line in enumerate(stdout) if line.startswith(f"step {step:>6} | train"))
        assert stdout[evaluation + 1] == f"sample at step {step}:", stdout
    assert not any(re.match(r"step +\d+ \| loss", line) for line in stdout), "plain per-step lines with a bar"
    assert len(stdout) < STEPS // 3 and len(cell.displays) < 5, (stdout, cell.displays)  # not a line per step
