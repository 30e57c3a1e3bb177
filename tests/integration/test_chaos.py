"""kill -9 aimed at checkpoint writes, again and again; no commit is lost and the run still ends bit-identical.
(Kills at random moments, 100 of them: ``python scripts/chaos.py``; in a background write: the self-test.)"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from nanoresume.tools.chaos import final_state_difference, run_chaos
from nanoresume.checkpoint import step_path
from tests.helpers import REPO

pytestmark = pytest.mark.slow

MAX_STEPS = 30
KILLS = 2  # each aimed at a checkpoint write (scripts/chaos.py does 100, half of them at random moments)
# A write every 5 steps: a start killed at its first write can never reach the last step, however fast it is.
FLAGS = dict(max_steps=MAX_STEPS, eval_interval=15, ckpt_interval=5, keep_last=2)


@pytest.fixture(scope="module")
def reference(reference_cli_run) -> Path:
    """The final checkpoint of the run never killed."""
    return step_path(reference_cli_run(**FLAGS) / "checkpoints", MAX_STEPS)


def test_a_run_killed_with_sigkill_again_and_again_ends_bitwise_equal_to_one_never_killed(tiny_cli_args, tmp_path,
                                                                                          reference):
    # Synchronous saves, so that a kill inside a write stops the loop itself mid-write. A kill inside a
    # background write is the self-test's "SIGKILL during a save" (test_selftest.py, whose config saves in
    # the background, asserts that it landed "(in a write)" and that the run still ends bit-exact).
    out = tmp_path / "chaos"
    # Seed 3 aims both kills at a checkpoint write. A kill aimed at a write waits for one as long as it
    # takes a busy machine to start the process and get there.
    report = run_chaos(tiny_cli_args(out_dir=str(out), **FLAGS, async_save=False), out, kills=KILLS, seed=3,
                       max_wait=2.5, write_delay=0.002, timeout=300, write_wait=120)

    assert report.kills == KILLS
    assert report.kills_during_write >= 1
    assert report.problems == []
    assert report.checkpoints_lost == 0
    assert final_state_difference(step_path(out / "checkpoints", MAX_STEPS), reference) is None


def test_the_chaos_script_help_names_each_default_once(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["chaos.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "scripts" / "chaos.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "(default: a temp folder)" in out and "(default: None)" not in out
