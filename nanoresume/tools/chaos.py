"""kill -9 chaos harness: kill a training run at random moments, resume it, and prove nothing was lost.

Used by the CI test (a handful of kills), by ``scripts/chaos.py`` (hundreds) and by the
self-test (:mod:`nanoresume.tools.selftest`). The child process is ``python -m
nanoresume.tools.chaos_child child ARGS...``: scripts/train.py with an observer of checkpoint writes registered
(:func:`nanoresume.checkpoint.observe`) so that every checkpoint write announces itself on
stderr and is slowed down, which lets the harness aim half of its kills inside a write
(evaluations announce themselves too, for the signal tests). ``python -m
nanoresume.tools.chaos_child script PATH ARGS...`` runs any Python script (a training loop of
your own that saves through :class:`nanoresume.Checkpointer`) with its writes announced the
same way. Production runs register no observer.
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
from typing import Any, Callable, Optional, Sequence

from .. import checkpoint
from ..checkpoint.folders import check_digests
from ..compare import first_difference
from ..config import RUNTIME_FIELDS
from ..loading import read_state
from ..rundir import RunDir
from ..training_state import CONFIG

WRITE_MARK = "chaos: checkpoint write started"
WRITE_DONE_MARK = "chaos: checkpoint write committed"
EVAL_MARK = "chaos: evaluation started"
WRITE_DELAY_ENV = "NANORESUME_CHAOS_WRITE_DELAY"  # seconds slept per written chunk in the child
# Set in the child's environment: writes are slowed only from when it receives SLOW_WRITES_SIGNAL on,
# so that the writes before the one a kill is aimed at cost nothing.
SLOW_LATER_ENV = "NANORESUME_CHAOS_SLOW_LATER"
SLOW_WRITES_SIGNAL = signal.SIGUSR2
FOLDER_COMMIT_DELAY_FACTOR = 50  # a folder's commit is held open this many write delays (0.1 s at 2 ms)


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
    """Step -> digest of every step checkpoint in ``folder`` that verifies: a file's own digest, or for a
    checkpoint folder (committed by its manifest) the digest of its manifest, once every file it lists
    matches."""
    good = {}
    for item in checkpoint.CheckpointDir(folder).list():
        try:
            if item.is_folder:
                digests = check_digests(Path(item.path))
                good[item.step] = hashlib.sha256(repr(sorted(digests.items())).encode()).hexdigest()
            else:
                good[item.step] = hashlib.sha256(checkpoint.read_verified(item.path)).hexdigest()
        except checkpoint.CheckpointError:
            continue
    return good


def torchrun_launcher(processes: int) -> list[str]:
    """The words that start ``processes`` workers on this machine (``--standalone``), before ``-m MODULE``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "--monitor-interval=0.1"]


def _child_command(train_args: list[str], launcher: Sequence[str] = ()) -> list[str]:
    """The child process: one process, or ``launcher`` (e.g. :func:`torchrun_launcher`) starting the workers."""
    return [*(launcher or [sys.executable]), "-m", "nanoresume.tools.chaos_child", "child", *train_args]


class WatchedProcess:
    """A training subprocess whose stderr is watched for checkpoint-write marks.

    ``command`` runs in ``cwd`` (default: the folder holding the nanoresume package, so that
    ``-m nanoresume...`` works from a checkout) with ``env`` added to this process's environment.
    ``own_group``: start it in a process group (and session) of its own, so that :meth:`kill` also
    reaches what it started and then left, which is no longer below it.
    """

    def __init__(self, command: list[str], write_delay: float, env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None, own_group: bool = False) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{WRITE_DELAY_ENV: str(write_delay)}, **(env or {}))
        self.own_group = own_group
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env, cwd=cwd or Path(__file__).resolve().parent.parent,
                                        start_new_session=own_group)
        self.writing = False  # between a write's first byte and its commit
        self.write_seen = threading.Event()
        self.writes_started = 0
        self.stderr_tail: list[str] = []
        self._reader = threading.Thread(target=self._watch, daemon=True)
        self._reader.start()

    def _watch(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if WRITE_MARK in line:
                self.writing = True
                self.writes_started += 1
                self.write_seen.set()
            elif WRITE_DONE_MARK in line:
                self.writing = False
            elif EVAL_MARK not in line:
                self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-5:]

    def wait(self, timeout: Optional[float] = None) -> int:
        """The exit code once the process has ended and its stderr is read to the end."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL the process and every process it started (torchrun's workers): a machine dying."""
        for pid in [*descendants(self.process.pid), self.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
        if self.own_group:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # its group is numbered after it
            except ProcessLookupError:
                pass  # nothing left in it
        self.process.wait()


def children(pid: int) -> list[int]:
    """The live processes ``pid`` started (Linux ``/proc``; none where it is missing)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``. torchrun starts its workers in sessions of their own, so a
    process group would not reach them."""
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


def run_chaos(train_args: list[str], out_dir: Path, kills: int, seed: int = 0, write_delay: float = 0.002,
              max_wait: float = 4.0, log: Callable[[str], None] = print, timeout: float = 600,
              launcher: Sequence[str] = (), write_wait: Optional[float] = None) -> ChaosReport:
    """Kill ``kills`` times, resuming with ``--resume auto`` after each, then let the run finish.

    ``train_args`` must include ``--out-dir out_dir``. Half of the kills wait for a
    checkpoint write to start and land inside it; the rest land at a random moment
    in the first ``max_wait`` seconds of the process. A kill aimed at a write waits for one at most
    ``write_wait`` seconds (default: 4 × ``max_wait``), then lands where the process is. Returns once the
    run exits 0. With a ``launcher`` (:func:`torchrun_launcher`) each kill takes the launcher and every
    worker at once, as a machine dying would; checkpoint folders (``--ckpt-format sharded``, FSDP) count
    as files do.
    """
    rng = random.Random(seed)
    report = ChaosReport()
    deadline = time.monotonic() + timeout
    args = list(train_args)
    while True:
        before = verified_steps(RunDir(out_dir).checkpoints)
        child = WatchedProcess(_child_command(args, launcher), write_delay)
        if report.kills < kills:
            aim_at_write = rng.random() < 0.5
            if aim_at_write:
                child.write_seen.wait(timeout=max_wait * 4 if write_wait is None else write_wait)
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


def comparable_state(path: Path) -> dict[str, Any]:
    """A checkpoint's whole state, less the config fields that only say how its run was started
    (``--out-dir``, ``--resume``, ...): they differ between a reference run and its interrupted twin
    by design. A checkpoint folder is read whole (all its shards, in the layout of a file)."""
    state = read_state(Path(path)) if Path(path).is_dir() else checkpoint.load_checkpoint(path)
    for name in RUNTIME_FIELDS:
        state.get(CONFIG, {}).pop(name, None)
    return state


def final_state_difference(a: Path, b: Path) -> Optional[str]:
    """None if two checkpoints hold the same full state bit for bit, else where they first differ.

    Everything is compared (model, optimizer, scheduler, scaler, counters, RNG streams,
    sampler, data fingerprint, config) except what :func:`comparable_state` leaves out. A
    checkpoint folder is compared whole, after loading all its shards (in the layout of a file).
    """
    return first_difference(comparable_state(a), comparable_state(b))


class _AnnouncedWrites(checkpoint.CheckpointObserver):
    """Announces every checkpoint file write on stderr (start and commit), slowed by ``delay`` seconds
    per written piece once ``slow`` is set."""

    def __init__(self, delay: float, slow: threading.Event) -> None:
        self.delay, self.slow = delay, slow
        self.previous: Optional[int] = None

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        if self.previous is None or nbytes <= self.previous:  # the count restarts with each file
            print(WRITE_MARK, file=sys.stderr, flush=True)
        self.previous = nbytes
        if self.delay and self.slow.is_set():
            time.sleep(self.delay)

    def before_commit(self, target: Path) -> None:
        """A checkpoint folder announces itself here, once this rank's shards are written (DCP reports no
        progress): the kill then lands in its commit, which is held open a little longer."""
        if target.name.endswith(".pt"):
            return  # a file announced itself through its progress
        print(WRITE_MARK, file=sys.stderr, flush=True)
        if self.delay and self.slow.is_set():
            time.sleep(self.delay * FOLDER_COMMIT_DELAY_FACTOR)

    def after_commit(self, target: Path) -> None:
        print(WRITE_DONE_MARK, file=sys.stderr, flush=True)


def observe_checkpoint_writes() -> None:
    """Announce every checkpoint write on stderr (start and commit), slowed by ``WRITE_DELAY_ENV``
    (with ``SLOW_LATER_ENV``: only once ``SLOW_WRITES_SIGNAL`` has arrived)."""
    slow = threading.Event()
    if os.environ.get(SLOW_LATER_ENV):
        signal.signal(SLOW_WRITES_SIGNAL, lambda signum, frame: slow.set())
    else:
        slow.set()
    checkpoint.observe(_AnnouncedWrites(float(os.environ.get(WRITE_DELAY_ENV, "0")), slow))
