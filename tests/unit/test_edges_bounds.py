"""A lone train file whose step is out of bounds (-5, 10**30), re-saved with a valid embedded digest: every
tool refuses it in one line, and so does ``--resume PATH`` (exit 2), so that ``ckpt verify`` ok means
resume accepts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoresume.checkpoint import load_checkpoint, save_atomically, step_path
from nanoresume.tools import ckpt, cli, evaluation, sampling
from tests.helpers import assert_one_line_error, run_main

GOOD_STEP = 10


@pytest.fixture
def run_out(reference_run, tmp_path: Path) -> Path:
    """A copy of a run trained once per session to step 10 (the run test_bad_checkpoints uses)."""
    return Path(reference_run(max_steps=GOOD_STEP, eval_interval=GOOD_STEP).copy_to(tmp_path / "out").out_dir)


@pytest.mark.parametrize("step", [-5, 10 ** 30])
def test_a_step_out_of_bounds_is_refused_by_every_tool_and_by_resume_in_one_line(run_out: Path, tmp_path: Path,
                                                                                tiny_text: Path, capsys,
                                                                                step: int) -> None:
    state = load_checkpoint(step_path(run_out / "checkpoints", GOOD_STEP))
    state["step"] = step
    bad = tmp_path / "bad.pt"
    save_atomically(state, bad)
    load_checkpoint(bad)  # the digest matches: only the schema check stands in the way
    needles = ("'step'", "2**62 - 1")

    proc = run_main(ckpt.main, ["verify", str(bad)], capsys)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BAD")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stdout
    assert_one_line_error(run_main(ckpt.main, ["show", str(bad)], capsys), *needles)
    assert_one_line_error(run_main(sampling.main, ["--ckpt", str(bad), "--max-new-tokens", "2"], capsys), *needles)
    assert_one_line_error(run_main(evaluation.main, ["--ckpt", str(bad), "--data", str(tiny_text), "--no-progress"],
                                   capsys), *needles)
    train = ["--out-dir", str(run_out), "--resume", str(bad), "--max-steps", "12", "--no-progress"]
    assert_one_line_error(run_main(cli.main, train, capsys), *needles)
