"""kill -9 at random moments (some inside checkpoint writes); the run still ends bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoresume.tools.chaos import final_state_difference, run_chaos
from nanoresume.checkpoint import step_path
from tests.helpers import REPO, run_script

pytestmark = pytest.mark.slow

MAX_STEPS = 200  # long enough that every kill lands before the run can finish
KILLS = 4
FLAGS = dict(max_steps=MAX_STEPS, eval_interval=50, ckpt_interval=20, keep_last=2)


@pytest.fixture(scope="module")
def reference(reference_cli_run) -> Path:
    """The final checkpoint of the run never killed (the same with background and synchronous saves)."""
    return step_path(reference_cli_run(**FLAGS) / "checkpoints", MAX_STEPS)


@pytest.mark.parametrize("async_save", [True, False], ids=["background saves", "synchronous saves"])
def test_a_run_killed_with_sigkill_again_and_again_ends_bitwise_equal_to_one_never_killed(tiny_cli_args, tmp_path,
                                                                                          reference, async_save):
    out = tmp_path / "chaos"
    report = run_chaos(tiny_cli_args(out_dir=str(out), **FLAGS, async_save=async_save), out, kills=KILLS, seed=1,
                       max_wait=2.5, write_delay=0.002, timeout=300)

    assert report.kills == KILLS
    assert report.kills_during_write >= 1
    assert report.problems == []
    assert report.checkpoints_lost == 0
    assert final_state_difference(step_path(out / "checkpoints", MAX_STEPS), reference) is None


def test_the_chaos_script_help_names_each_default_once():
    result = run_script(REPO / "scripts" / "chaos.py", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(default: a temp folder)" in result.stdout and "(default: None)" not in result.stdout
