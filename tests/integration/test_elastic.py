"""Elastic torchrun, real processes: when one of two agents dies for good (``--nnodes 1:2``) the other
continues alone from the last commit with the same global batch.

(A SIGKILLed torchrun, whose workers save and exit, and a killed worker under ``--max-restarts``:
tests/integration/test_distributed.py's stop chain, which ends bit for bit equal to its uninterrupted
reference run.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nanoresume.checkpoint import load_checkpoint, step_path
from tests.harness.probes import read_records
from tests.helpers import REPO, cli_flags, launch_tree
from tests.integration.test_distributed import (FLAGS, environment, free_port, global_windows, wait_for_steps,
                                                windows_by_step)

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_elastic_job_that_loses_an_agent_for_good_continues_on_one_process_with_the_same_global_batch(
        tiny_text, tmp_path):
    """Two agents (``--nnodes 1:2``, one worker each, c10d rendezvous on loopback). The second agent and its
    worker are SIGKILLed: the first one's worker loses its peer, torchrun restarts it, the rendezvous closes
    with one agent, and the lone worker resumes from the last commit with accumulation 2 (global batch 4)."""
    out, records = tmp_path / "out", tmp_path / "records"
    train_args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(out), cache_dir=str(tmp_path / "cache"),
                                max_steps=40, ckpt_interval=5))
    port = free_port()
    # The first agent hosts the rendezvous store; the dead agent must be the other one (docs/elastic.md).
    agents = []
    for node in (0, 1):
        agents.append(launch_tree(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=elastic-{port}",
             "--rdzv_conf=join_timeout=120,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3",
             "--monitor-interval=0.1", "-m", "nanoresume.tools.chaos_child", "child", *train_args,
             "--resume", "auto"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(records), cwd=REPO))
        deadline = time.monotonic() + 60
        while node == 0 and not listening(port):
            assert time.monotonic() < deadline, "the first agent never opened the rendezvous"
            time.sleep(0.05)
    wait_for_steps(records, 12, timeout=180)
    victim = agents[1]
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    for pid in [victim.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    output = agents[0].communicate(timeout=240)[0]
    assert agents[0].returncode == 0, output
    assert "torchrun restarted the workers (restart 1 of 3)" in output, output
    assert "processes: 2 -> 1 (global batch 4 sequences per step)" in output and "--grad-accum: 1 -> 2" in output
    [resumed] = [int(line.rsplit(" ", 1)[1].replace(",", "")) for line in output.splitlines()
                 if line.startswith("resumed from ")]
    assert resumed >= 10 and resumed % 5 == 0, output
    assert load_checkpoint(step_path(out / "checkpoints", 40))["world_size"] == 1
    # every step, before and after the loss of a process, drew the same global batch of 4 windows
    expected = global_windows(output, 4, 40)
    both, lone = windows_by_step(records, 2), read_records(records, 0)[1]
    assert all(both[i] == expected[i] for i in range(10)), "two processes"
    assert all(lone[i] == expected[i] for i in range(resumed, 40)), "one process"
