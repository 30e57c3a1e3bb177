"""kill -9 while checkpoint folders are written and committed (``--ckpt-format sharded``): no committed
folder is lost and the run ends bit-identical. One process here, to stay cheap;
``benchmarks/chaos_folders.py`` does the same to FSDP under torchrun (2 processes, 20 kills), and
tests/integration/test_fsdp.py SIGKILLs one FSDP rank inside a folder's write.

Two kills, both aimed inside a folder's write (the seed draws them so): a kill at a random moment of a
process this short lands in its start-up, before any checkpoint is open, and proves nothing more. Each
kill waits for a write however long the start-up takes on a loaded machine (``write_wait``). Every
kill lands before the run can finish: each waits for a write, and the last step's is one."""

from __future__ import annotations

import pytest

from nanoresume.checkpoint import step_folder_path
from nanoresume.tools.chaos import final_state_difference, run_chaos, verified_steps

pytestmark = pytest.mark.slow

MAX_STEPS = 40
KILLS = 2  # seed 3 aims both at a write
FLAGS = dict(max_steps=MAX_STEPS, eval_interval=20, ckpt_interval=10, keep_last=2, ckpt_format="sharded")


def test_a_run_writing_checkpoint_folders_killed_again_and_again_loses_no_commit_and_ends_bitwise_equal(
        tiny_cli_args, reference_cli_run, tmp_path):
    reference = step_folder_path(reference_cli_run(**FLAGS) / "checkpoints", MAX_STEPS)
    out = tmp_path / "chaos"
    report = run_chaos(tiny_cli_args(out_dir=str(out), **FLAGS), out, kills=KILLS, seed=3, max_wait=2.5,
                       write_delay=0.002, timeout=300, write_wait=120)
    assert report.kills == KILLS and report.kills_during_write >= 1, report.summary()
    assert report.problems == [] and report.checkpoints_lost == 0
    assert MAX_STEPS in verified_steps(out / "checkpoints")  # a folder, verified by its manifest
    assert final_state_difference(step_folder_path(out / "checkpoints", MAX_STEPS), reference) is None
