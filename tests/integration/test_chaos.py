"""kill -9 at random moments (some inside checkpoint writes); the run still ends bit-identical."""

from __future__ import annotations

import pytest

from nanoresume.chaos import final_state_difference, run_chaos
from nanoresume.checkpoint import step_path
from tests.helpers import REPO, run_script, run_train

pytestmark = pytest.mark.slow

MAX_STEPS = 300  # long enough that all five kills land before the run can finish


@pytest.mark.parametrize("async_save", [True, False], ids=["background saves", "synchronous saves"])
def test_a_run_killed_with_sigkill_again_and_again_ends_bitwise_equal_to_one_never_killed(tiny_cli_args, tmp_path,
                                                                                          async_save):
    flags = dict(max_steps=MAX_STEPS, eval_interval=50, ckpt_interval=10, keep_last=2, async_save=async_save)
    reference = run_train(tiny_cli_args(out_dir=str(tmp_path / "reference"), **flags))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "chaos"
    report = run_chaos(tiny_cli_args(out_dir=str(out), **flags), out, kills=5, seed=1, max_wait=3.0,
                       write_delay=0.002, timeout=300)

    assert report.kills == 5
    assert report.kills_during_write >= 1
    assert report.problems == []
    assert report.checkpoints_lost == 0
    assert final_state_difference(step_path(out / "checkpoints", MAX_STEPS),
                                  step_path(tmp_path / "reference" / "checkpoints", MAX_STEPS)) is None


def test_the_chaos_script_help_names_each_default_once():
    result = run_script(REPO / "scripts" / "chaos.py", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(default: a temp folder)" in result.stdout and "(default: None)" not in result.stdout
