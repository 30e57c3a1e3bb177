"""torchrun (gloo, CPU): a 2-process run mirrored, stopped and "lost" resumes on a new OUT from the mirror
with 2 processes, every rank holding the state saved bit for bit, and with 1 (the global batch kept by
accumulation). Rank 0 alone uploads.

Two launches: that a resume from a state restored bit for bit continues bit for bit like the run never
stopped is tests/integration/test_distributed.py's (its stop chain, against an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from nanoresume.checkpoint import load_checkpoint
from nanoresume.compare import first_difference
from nanoresume.config import RUNTIME_FIELDS
from tests.harness.probes import DUMP_RESUMED_ENV, STOP_ENV
from nanoresume.tools import cli
from tests.helpers import REPO, TINY_FLAGS, cli_flags, run_main, run_tree

HARNESS = REPO / "tests" / "harness"  # its sitecustomize installs the probes (STOP_ENV) in every process
FLAGS = dict(TINY_FLAGS, batch_size=2, dropout=0.0, max_steps=20, eval_interval=10, ckpt_interval=10, progress=False)


def torchrun(nproc: int, flags: list[str], **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--monitor-interval=0.1", "--shutdown-timeout=10", "-m", "nanoresume.tools.chaos_child", "child"]
    path = os.pathsep.join(p for p in (str(HARNESS), os.environ.get("PYTHONPATH")) if p)
    environ = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=path, **env)
    return run_tree(command + flags, 180, env=environ, cwd=REPO)


def without_runtime_fields(state: dict) -> dict:
    """``state`` less the config fields that say how its run was started (``--resume``, ...)."""
    for name in RUNTIME_FIELDS:
        state["config"].pop(name, None)
    return state


@pytest.mark.slow
def test_a_two_process_run_lost_after_its_mirror_resumes_from_it_with_two_processes_and_with_one(
        tiny_text, tmp_path, capsys):
    def flags(out: str, mirror: Path, **more: object) -> list[str]:
        return cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(tmp_path / out),
                              cache_dir=str(tmp_path / "cache"), mirror=str(mirror), **more))

    mirror = tmp_path / "mirror"
    stopped = torchrun(2, flags("out", mirror), **{STOP_ENV: "10"})  # as a SIGTERM at step 10, on every rank
    assert "stopped by SIGTERM after step 10" in stopped.stdout, stopped.stdout + stopped.stderr
    assert f"mirrored step 10 to {mirror}" in stopped.stdout
    assert stopped.stdout.count("mirrored step") == 1, "rank 0 alone uploads and speaks"
    shutil.copytree(mirror, tmp_path / "mirror-for-one")
    saved = without_runtime_fields(load_checkpoint(tmp_path / "out" / "checkpoints" / "step_00000010.pt"))
    shutil.rmtree(tmp_path / "out")  # the machine is lost

    two = torchrun(2, flags("out", mirror, resume="auto"), **{DUMP_RESUMED_ENV: str(tmp_path / "resumed.pt")})
    assert two.returncode == 0, two.stdout + two.stderr
    assert f"resumed from {mirror}/checkpoints/step_00000010.pt at step 10" in two.stdout
    resumed = without_runtime_fields(torch.load(tmp_path / "resumed.pt", weights_only=False))
    assert first_difference(resumed, saved) is None, first_difference(resumed, saved)  # every rank's, gathered
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "step_00000020.pt")["step"] == 20

    one = run_main(cli.main, flags("one", tmp_path / "mirror-for-one", resume="auto"), capsys)  # in-process
    assert one.returncode == 0, one.stdout + one.stderr
    assert f"resumed from {tmp_path / 'mirror-for-one'}/checkpoints/step_00000010.pt at step 10" in one.stdout
    assert "--grad-accum: 1 -> 2" in one.stdout  # the global batch of 2 processes, kept
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 21))
