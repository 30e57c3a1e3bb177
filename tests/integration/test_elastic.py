"""Elastic torchrun, real processes: when torchrun's launcher itself dies (SIGKILL) its workers notice,
save at the next step boundary as for a SIGTERM, say how to continue with torchrun's own command, and
exit, leaving no orphan; when one of two agents dies for good (``--nnodes 1:2``) the other continues
alone from the last commit with the same global batch.

(A killed worker under ``--max-restarts``: tests/integration/test_distributed.py, which shares its
uninterrupted reference run.)
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
from nanoresume.config import TrainConfig
from nanoresume.data import BatchSampler
from tests.harness.probes import read_records
from tests.helpers import REPO, cli_flags, launch_tree
from tests.integration.test_distributed import (FLAGS, environment, free_port, launch_command, losses,
                                                wait_for_steps, windows_by_step, worker_pid)

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
    train_tokens = int(output.split(" train + ")[0].rsplit(" ", 1)[1].replace(",", ""))
    sampler = BatchSampler(train_tokens, FLAGS["block_size"], 4, TrainConfig().seed)
    both, lone = windows_by_step(records, 2), read_records(records, 0)[1]
    assert all(both[i] == sampler.step_offsets(i).tolist() for i in range(10)), "two processes"
    assert all(lone[i] == sampler.step_offsets(i).tolist() for i in range(resumed, 40)), "one process"
