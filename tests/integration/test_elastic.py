"""torchrun's launcher itself dies (SIGKILL): its workers notice, save at the next step boundary as for a
SIGTERM, say how to continue with torchrun's own command, and exit, leaving no orphan. Real processes.

(A killed worker under ``--max-restarts``: tests/integration/test_distributed.py, which shares its
uninterrupted reference run.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from nanoresume.checkpoint import load_checkpoint, step_path
from tests.helpers import REPO, launch_tree
from tests.integration.test_distributed import (FLAGS, environment, launch_command, losses, wait_for_steps,
                                                worker_pid)
from tests.helpers import cli_flags

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_workers_of_a_sigkilled_torchrun_save_at_the_next_step_name_torchrun_s_command_and_exit(tiny_text, tmp_path):
    out, records = tmp_path / "out", tmp_path / "records"
    train_args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(out), cache_dir=str(tmp_path / "cache"),
                                max_steps=100000, ckpt_interval=100000))
    launcher = launch_tree(launch_command(2) + train_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=environment(records), cwd=REPO)
    wait_for_steps(records, 5)
    workers = [worker_pid(launcher.pid, rank) for rank in (0, 1)]
    launcher.kill()  # SIGKILL: torchrun can forward nothing
    output = launcher.communicate(timeout=60)[0]  # EOF once the workers, which share its stdout, are gone too
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"orphaned workers still running: {workers}"
        time.sleep(0.05)

    last = [max(losses(records, rank)) for rank in (0, 1)]
    assert last[0] == last[1], output  # both stopped after the same step ...
    assert load_checkpoint(step_path(out / "checkpoints", last[0]))["step"] == last[0]  # ... and committed it
    assert (out / "exit_code").read_text() == f"{128 + signal.SIGTERM}\n"
    [stopped] = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert f"after step {last[0]}" in stopped
    # the command that continues the run is torchrun's (2 processes), not the worker's own (1 process)
    again = stopped.split("Continue with: ")[1]
    assert again.startswith(f"{os.path.basename(launch_command(2)[0])} -m torch.distributed.run ") or \
        again.startswith(f"{launch_command(2)[0]} -m torch.distributed.run "), again
    assert "--nproc_per_node=2" in again and again.endswith("--resume auto"), again
