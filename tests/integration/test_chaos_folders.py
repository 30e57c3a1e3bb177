"""kill -9 at random moments while checkpoint folders are written and committed (``--ckpt-format
sharded``): no committed folder is lost and the run ends bit-identical. One process here, to stay cheap;
``benchmarks/chaos_folders.py`` does the same to FSDP under torchrun (2 processes, 20 kills)."""

from __future__ import annotations

import pytest

from nanoresume.checkpoint import step_folder_path
from nanoresume.tools.chaos import final_state_difference, run_chaos, verified_steps

pytestmark = pytest.mark.slow

MAX_STEPS = 120  # long enough that every kill lands before the run can finish
KILLS = 3
FLAGS = dict(max_steps=MAX_STEPS, eval_interval=40, ckpt_interval=10, keep_last=2, ckpt_format="sharded")


def test_a_run_writing_checkpoint_folders_killed_again_and_again_loses_no_commit_and_ends_bitwise_equal(
        tiny_cli_args, reference_cli_run, tmp_path):
    reference = step_folder_path(reference_cli_run(**FLAGS) / "checkpoints", MAX_STEPS)
    out = tmp_path / "chaos"
    report = run_chaos(tiny_cli_args(out_dir=str(out), **FLAGS), out, kills=KILLS, seed=3, max_wait=2.5,
                       write_delay=0.002, timeout=300)
    assert report.kills == KILLS and report.kills_during_write >= 1, report.summary()
    assert report.problems == [] and report.checkpoints_lost == 0
    assert MAX_STEPS in verified_steps(out / "checkpoints")  # a folder, verified by its manifest
    assert final_state_difference(step_folder_path(out / "checkpoints", MAX_STEPS), reference) is None
