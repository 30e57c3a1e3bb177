"""kill -9 chaos harness: kill a training run at random moments, resume it, and prove nothing was lost.

Used by the CI test (a handful of kills) and by ``scripts/chaos.py`` (hundreds).
The child process is ``python -m nanoresume.chaos child ARGS...``: scripts/train.py
with :data:`nanoresume.checkpoint.files.testing_write_hook` set so that every checkpoint
write announces itself on stderr and is slowed down, which lets the harness aim
half of its kills inside a write (evaluations announce themselves too, for the
signal tests). Production runs never set that hook.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import checkpoint
from .checkpoint import files as checkpoint_files
from .checkpoint import manager as checkpoint_manager
from .compare import first_difference
from .config import RUNTIME_FIELDS
from .loading import read_state
from .rundir import RunDir

WRITE_MARK = "chaos: checkpoint write started"
WRITE_DONE_MARK = "chaos: checkpoint write committed"
EVAL_MARK = "chaos: evaluation started"
WRITE_DELAY_ENV = "NANORESUME_CHAOS_WRITE_DELAY"  # seconds slept per written chunk in the child


@dataclass
class ChaosReport:
    kills: int = 0
    kills_during_write: int = 0
    resumes: int = 0
    checkpoints_lost: int = 0  # committed checkpoints that vanished or stopped verifying after a kill
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"kills: {self.kills} ({self.kills_during_write} during a checkpoint write), "
                f"resumes: {self.resumes}, checkpoints lost: {self.checkpoints_lost}")


def verified_steps(folder: Path) -> dict[int, str]:
    """Step -> digest of every step checkpoint in ``folder`` whose checksum verifies."""
    manager = checkpoint.CheckpointManager(folder, interval=1, keep_last=1)
    good = {}
    for item in manager.list():
        try:
            payload = checkpoint.read_verified(item.path)
        except checkpoint.CheckpointError:
            continue
        good[item.step] = hashlib.sha256(payload).hexdigest()
    return good


def _child_command(train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "nanoresume.chaos", "child", *train_args]


class _Child:
    """A training subprocess whose stderr is watched for checkpoint-write marks."""

    def __init__(self, train_args: list[str], write_delay: float) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{WRITE_DELAY_ENV: str(write_delay)})
        self.process = subprocess.Popen(_child_command(train_args), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env,
                                        cwd=Path(__file__).resolve().parent.parent)
        self.writing = False  # between a write's first byte and its commit
        self.write_seen = threading.Event()
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if WRITE_MARK in line:
                self.writing = True
                self.write_seen.set()
            elif WRITE_DONE_MARK in line:
                self.writing = False
            else:
                self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-5:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def run_chaos(train_args: list[str], out_dir: Path, kills: int, seed: int = 0, write_delay: float = 0.002,
              max_wait: float = 4.0, log: Callable[[str], None] = print, timeout: float = 600) -> ChaosReport:
    """Kill ``kills`` times, resuming with ``--resume auto`` after each, then let the run finish.

    ``train_args`` must include ``--out-dir out_dir``. Half of the kills wait for a
    checkpoint write to start and land inside it; the rest land at a random moment
    in the first ``max_wait`` seconds of the process. Returns once the run exits 0.
    """
    rng = random.Random(seed)
    report = ChaosReport()
    deadline = time.monotonic() + timeout
    args = list(train_args)
    while True:
        before = verified_steps(RunDir(out_dir).checkpoints)
        child = _Child(args, write_delay)
        if report.kills < kills:
            aim_at_write = rng.random() < 0.5
            if aim_at_write:
                child.write_seen.wait(timeout=max_wait * 4)
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                time.sleep(rng.uniform(0.2, max_wait))
            if child.process.poll() is None:
                landed_in_write = child.writing  # read just before the kill: may be off by one mark
                child.kill()
                report.kills += 1
                report.kills_during_write += landed_in_write
                _count_losses(before, verified_steps(RunDir(out_dir).checkpoints), report)
                args = _with_resume_auto(args)
                report.resumes += 1
                continue
        code = child.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0:
            report.problems.append(f"training exited {code}: {' | '.join(child.stderr_tail)}")
        log(report.summary())
        return report


def _count_losses(before: dict[int, str], after: dict[int, str], report: ChaosReport) -> None:
    """A checkpoint committed before the kill must still verify after it, unless retention
    legitimately removed it because a newer one was committed."""
    newest_after = max(after, default=-1)
    for step, digest in before.items():
        if step in after:
            if after[step] != digest:
                report.checkpoints_lost += 1
                report.problems.append(f"step {step} changed after a kill")
        elif step >= newest_after:
            report.checkpoints_lost += 1
            report.problems.append(f"step {step} vanished after a kill with no newer checkpoint")


def _with_resume_auto(args: list[str]) -> list[str]:
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        out.append(a)
    return out + ["--resume", "auto"]


def final_state_difference(a: Path, b: Path) -> Optional[str]:
    """None if two checkpoints hold the same full state bit for bit, else where they first differ.

    Everything is compared (model, optimizer, scheduler, scaler, counters, RNG streams,
    sampler, data fingerprint, config) except the config fields that only say how each
    run was started (``--out-dir``, ``--resume``, ...), which differ between a reference
    run and its interrupted twin by design. A checkpoint folder is compared whole, after
    loading all its shards (in the layout of a file).
    """
    states = [read_state(Path(path)) if Path(path).is_dir() else checkpoint.load_checkpoint(path) for path in (a, b)]
    for state in states:
        for name in RUNTIME_FIELDS:
            state["config"].pop(name, None)
    return first_difference(states[0], states[1])


def _child_main(argv: list[str]) -> int:
    """scripts/train.py with observable (and slowed) checkpoint writes and evaluations (tests only)."""
    from . import probes
    from .cli import main
    from .trainer import Trainer

    probes.install()
    evaluate = Trainer.evaluate

    def announced_evaluate(self: Trainer) -> object:
        print(EVAL_MARK, file=sys.stderr, flush=True)
        return evaluate(self)

    Trainer.evaluate = announced_evaluate  # type: ignore[method-assign]

    delay = float(os.environ.get(WRITE_DELAY_ENV, "0"))

    previous = [None]

    def hook(bytes_written: int) -> None:
        if previous[0] is None or bytes_written <= previous[0]:  # the count restarts with each file
            print(WRITE_MARK, file=sys.stderr, flush=True)
        previous[0] = bytes_written
        if delay:
            time.sleep(delay)

    save_atomically = checkpoint_manager.save_atomically

    def announced_save(obj: dict, path: Path) -> str:
        digest = save_atomically(obj, path)
        print(WRITE_DONE_MARK, file=sys.stderr, flush=True)
        return digest

    checkpoint_files.testing_write_hook = hook
    checkpoint_manager.save_atomically = announced_save  # type: ignore[assignment]
    return main(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: python -m nanoresume.chaos child TRAIN_ARGS... (see scripts/chaos.py for the harness)")
