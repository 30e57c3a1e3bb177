"""A worker SIGKILLed inside a collective (torchrun, 2 processes, gloo): the survivor says so in one line
naming the lost rank and the fix, with no traceback, and exits 1; every committed checkpoint stays.

Each rank's stderr goes to a file of its own (torchrun ``--redirects``). The probe
``NANORESUME_PROBE_DIE_IN`` (tests/harness/probes.py) picks the site, the rank and the call, in each
attempt of one torchrun launch (``--max-restarts=1``: the restart is the rerun a user would type).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nanoresume.checkpoint import CheckpointDir, load_checkpoint
from tests.harness.probes import DIE_IN_ENV
from tests.helpers import REPO, TINY_FLAGS, cli_flags, run_tree
from tests.integration.test_distributed import environment

pytestmark = pytest.mark.slow

FLAGS = dict(TINY_FLAGS, batch_size=2, dropout=0.0, max_steps=24, eval_interval=8, ckpt_interval=4, progress=False)


def launch(data: Path, out: Path, logs: Path, die_in: str) -> int:
    """torchrun over ``scripts/train.py --resume auto``, restarting its workers once, with one rank dying in
    each attempt as ``die_in`` says; returns torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "--monitor-interval=0.1", f"--log-dir={logs}", "--redirects=3",
               str(REPO / "scripts" / "train.py"),
               *cli_flags(dict(FLAGS, data=str(data), out_dir=str(out), cache_dir=str(out.parent / "cache"))),
               "--resume", "auto"]
    result = run_tree(command, timeout=120, env=environment(out.parent / "records", **{DIE_IN_ENV: die_in}),
                      cwd=REPO)
    return result.returncode


def survivor_stderr(logs: Path, attempt: int, rank: int) -> str:
    [path] = logs.glob(f"*/attempt_{attempt}/{rank}/stderr.log")
    return path.read_text()


def assert_one_line_about_the_lost_peer(logs: Path, attempt: int, survivor: int, site: str) -> None:
    text = survivor_stderr(logs, attempt, survivor)
    assert "Traceback" not in text, text
    # torchrun SIGTERMs the survivor a moment after the death; landing in its teardown, that signal ends it
    # at once with the one line of a forced exit (tests/integration/test_signals.py), after this one
    lines = [line for line in text.strip().splitlines() if not line.startswith("forced exit; last committed")]
    assert len(lines) == 1, text
    assert lines[0].startswith(f"error: rank {survivor} lost contact with rank {1 - survivor} during {site}: "
                               f"it died or was killed"), lines[0]
    assert "rerun with --resume auto" in lines[0]


def assert_committed_checkpoints_load(out: Path, at_least: int) -> None:
    steps = [item.step for item in CheckpointDir(out / "checkpoints").list()]
    assert steps and max(steps) >= at_least, steps
    for step in steps:
        assert load_checkpoint(out / "checkpoints" / f"step_{step:08d}.pt")["step"] == step


def test_a_worker_killed_in_a_collective_leaves_one_line_on_the_survivor_and_every_commit(tiny_text, tmp_path):
    """Rank 0 dies in step 8's evaluation (rank 1 speaks), then, in the restart, rank 1 dies as the run
    resumes, in the broadcast of what to resume from (rank 0 speaks, before the loop). Every site's error,
    cheaper: tests/unit/test_distributed.py."""
    out = tmp_path / "out"
    assert launch(tiny_text, out, tmp_path / "logs", "eval:0:2;broadcast:1:1") != 0
    assert_one_line_about_the_lost_peer(tmp_path / "logs", 0, 1, "evaluation")
    assert_one_line_about_the_lost_peer(tmp_path / "logs", 1, 0, "the resume broadcast")
    assert_committed_checkpoints_load(out, 4)
