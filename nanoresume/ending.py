"""How a run ends, and what it reports: :class:`RunResult`, the wait for the last commit, the last
line (finished, or stopped and how to continue where the run was started), the exit code, and the
mirror's bounded catch-up.

The trainer hands its :class:`Ending` the outcome of its loop; nothing here decides *whether* to stop
(that is :mod:`nanoresume.stopping`), only how the end is told and recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import distributed, launcher, messages
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import DistributedEnv
from .mirror.link import MirrorLink
from .rundir import RunDir
from .signals import StopFlag
from .stopping import Outcome
from .training_state import Counters


@dataclass
class RunResult:
    """What a call to :meth:`Trainer.run` (or :func:`nanoresume.train`) did."""

    step: int  # the step training reached (a resumed run counts from the start of the run, not of this call)
    stop_reason: Optional[str]  # None when training reached max_steps; "SIGINT", "time limit", ...
    exit_code: int  # what the command line would exit with: 0 finished, 128+signal, 75 time limit
    last_checkpoint: Optional[Path] = None  # the newest committed step checkpoint (None: none yet)
    best_val_loss: Optional[float] = None  # the best validation loss so far (None: no evaluation yet)
    best_checkpoint: Optional[Path] = None  # best.pt, the weights of that evaluation (None: not written yet)
    steps_trained: int = 0  # optimizer steps taken by this call

    @property
    def finished(self) -> bool:
        """Whether training reached ``max_steps`` (else it stopped early, and a resume continues it)."""
        return self.stop_reason is None


@dataclass(frozen=True)
class Origin:
    """Where the run was started, for the line after a stop that says how to continue it."""

    continue_in: str  # "shell" (the command), "notebook" (run the cell again), "python"
    command: Sequence[str]  # what the user runs to train
    launcher: Optional[Sequence[str]]  # torchrun's command line, read at start (the launcher may be gone by now)


def continue_hint(continue_in: str, stop: StopFlag) -> str:
    """After "interrupted; last committed checkpoint: step N": how to continue, where the run was started."""
    return messages.how_to_continue(continue_in, stop.last_committed_step)


def wait_for_commit(stop: StopFlag, manager: CheckpointManager, log: Callable[[str], None]) -> None:
    """Wait for the save in flight. In library use, a user who insists meanwhile is told what is being
    waited for, and that another interrupt abandons it (the command line exits at once instead)."""
    told = stop.forced_exit is not None
    while not told and manager.in_flight:
        if stop.forced:
            log(messages.waiting_for_commit(manager.staged_step, stop.last_committed_step))
            told = True
        else:
            time.sleep(0.02)
    manager.wait()


def last_line(outcome: Outcome, counters: Counters, last_checkpoint: Optional[Path], stop: StopFlag,
              origin: Origin, out_dir: str, launched: bool, best: Path, elapsed_seconds: float) -> str:
    """How the run ended: finished, or stopped (why, what is saved, how to continue)."""
    step = counters.step
    if outcome.kind != "stop":
        return messages.finished(step, counters.tokens_seen, counters.best_val_loss, best, elapsed_seconds)
    if origin.continue_in != "shell":
        return messages.stopped_in_python(outcome.reason, step, last_checkpoint, stop.last_committed_step,
                                          origin.continue_in)
    if launched:  # the launcher's command: the worker's own would continue on one process
        return messages.stopped_under_torchrun(
            outcome.reason, step, last_checkpoint,
            launcher.resume_auto(origin.launcher) if origin.launcher is not None else None)
    return messages.stopped(outcome.reason, step, last_checkpoint, origin.command, out_dir)


class Ending:
    """The end of one :meth:`Trainer.run`: :meth:`finish` after the loop, or :meth:`nothing_to_do`.
    ``log`` is the run's console; ``mirror_link``: rank 0's, with ``--mirror``."""

    def __init__(self, cfg: TrainConfig, env: DistributedEnv, stop: StopFlag, manager: CheckpointManager,
                 run_dir: RunDir, counters: Counters, log: Callable[[str], None], origin: Origin, started: float,
                 mirror_link: Optional[MirrorLink], folder_checkpoints: bool) -> None:
        self.cfg, self.env, self.stop, self.manager, self.run_dir = cfg, env, stop, manager, run_dir
        self.counters, self.log, self.origin, self.started = counters, log, origin, started
        self.mirror_link, self.folder_checkpoints = mirror_link, folder_checkpoints

    def nothing_to_do(self, result: RunResult, first_step: int) -> None:
        """A run already at ``max_steps`` (nothing to train, nothing to evaluate): say so, exit code 0."""
        self.log(messages.nothing_to_do(self.counters.step, self.cfg.max_steps))
        self.fill(result, first_step)
        if self.env.is_main:
            self.run_dir.write_exit_code(0)
            self._finish_mirror()  # a mirror behind a finished run catches up

    def finish(self, outcome: Outcome, result: RunResult) -> None:
        """Wait for the last commit on every rank, then say how the run ended and record its exit code."""
        if self.env.is_main or self.folder_checkpoints:  # the stop message names a committed checkpoint
            wait_for_commit(self.stop, self.manager, self.log)
        distributed.barrier("the wait for the last commit")  # no rank exits (and makes torchrun stop the others) first
        result.step, result.last_checkpoint = self.counters.step, self.manager.committed_path
        if outcome.kind == "stop":
            result.stop_reason, result.exit_code = outcome.reason, outcome.exit_code
        self.log(last_line(outcome, self.counters, result.last_checkpoint, self.stop, self.origin, self.cfg.out_dir,
                           self.env.launched, self.run_dir.best, time.monotonic() - self.started))
        if self.env.is_main:
            self.run_dir.write_exit_code(result.exit_code)
            self._finish_mirror()  # the exit code stays the stop's

    def fill(self, result: RunResult, first_step: int) -> None:
        """What the run reached: its step, checkpoints and best validation loss."""
        counters, best = self.counters, self.run_dir.best
        result.step, result.steps_trained = counters.step, counters.step - first_step
        result.last_checkpoint = self.manager.committed_path
        result.best_val_loss = counters.best_val_loss if math.isfinite(counters.best_val_loss) else None
        result.best_checkpoint = best if best.exists() else None

    def _finish_mirror(self) -> None:
        """After the last local commit, a bounded wait for the final upload, and what the mirror holds."""
        if self.mirror_link is None:
            return
        limit = self.cfg.time_limit
        time_left = None if limit is None else limit - (time.monotonic() - self.started)
        self.log(self.mirror_link.finish(self.cfg.mirror_wait, self.stop.forced, time_left))
