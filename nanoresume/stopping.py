"""When training stops: the votes every rank takes once per step, and the one outcome of each step.

The trainer calls :meth:`StepDecisions.vote` inside each step (one collective, before the weights
change) and :meth:`StepDecisions.outcome` after it: CONTINUE, a stop (reason and exit code) or
FINISHED. Nothing else decides a stop. :func:`decide` and :func:`time_is_up` are pure.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import distributed
from .distributed import DistributedEnv, StepVotes
from .errors import CheckpointWriteError
from .signals import TIME_LIMIT_EXIT_CODE, TIME_LIMIT_REASON, StopFlag


class Outcome(NamedTuple):
    """What follows a step: ``"continue"``, ``"stop"`` (why, and the exit code) or ``"finished"``."""

    kind: str
    reason: Optional[str] = None
    exit_code: int = 0


CONTINUE = Outcome("continue")
FINISHED = Outcome("finished")


def decide(step: int, max_steps: int, evaluation_due: bool, stop_agreed: bool, reason: Optional[str],
           exit_code: int) -> Outcome:
    """FINISHED at ``max_steps`` with its evaluation done; a stop (``reason``, ``exit_code``) when one was
    agreed, or at ``max_steps`` when a stop cut its evaluation short (a restart redoes it); else CONTINUE."""
    if step >= max_steps and not evaluation_due:
        return FINISHED
    if stop_agreed or step >= max_steps:
        return Outcome("stop", reason, exit_code)
    return CONTINUE


def time_is_up(elapsed: float, time_limit: Optional[float], slowest_step: float, last_eval_seconds: float,
               last_commit_seconds: float) -> bool:
    """Whether to stop now, while there is still time for one more step, an evaluation and a save
    (with room to spare) before ``time_limit`` seconds have passed. All times in seconds."""
    if time_limit is None:
        return False
    needed = 2 * slowest_step + last_eval_seconds + 2 * last_commit_seconds + 1.0
    return elapsed + needed >= time_limit


class StepDecisions:
    """The decisions the ranks take together once per step, and what follows each step.

    ``manager`` is the run's CheckpointManager (rank 0 polls its writer and reads its clock);
    ``started`` the ``clock()`` reading that ``time_limit`` counts from.
    """

    def __init__(self, stop: StopFlag, env: DistributedEnv, manager: Any, time_limit: Optional[float],
                 started: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop, self.env, self.manager = stop, env, manager
        self.time_limit, self.started, self.clock = time_limit, started, clock
        self.votes: Optional[StepVotes] = None  # the last step's
        self.slowest_step = 0.0  # seconds
        self.last_eval_seconds = 0.0
        self._save_error: Optional[Exception] = None

    def vote(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> StepVotes:
        """This step's decisions, the same on every rank: one small collective and one device sync.

        A stop another rank (or rank 0's clock) asked for is requested on this rank's flag too. A
        background save that failed is found here (rank 0 polls its writer) and raised on every rank
        at this step, as a synchronous failure would have been.
        """
        failed = False
        if self.env.is_main:
            try:
                self.manager.poll()
            except CheckpointWriteError as e:
                self._save_error, failed = e, True
        votes = self.votes = distributed.agree(
            loss, grad_norm, stop_code=self.stop.exit_code if self.stop.is_set() else 0,
            time_up=self.env.is_main and self._time_is_up(),
            save_time_due=self.env.is_main and self.manager.time_due(), save_failed=failed)
        if votes.stop_code and not self.stop.is_set():
            self.stop.request(*StopFlag.describe(votes.stop_code))  # a signal another rank received
        if votes.time_up:
            self.stop.request(TIME_LIMIT_REASON, TIME_LIMIT_EXIT_CODE)
        if votes.save_failed:
            if self.env.is_main and self._save_error is not None:
                raise self._save_error
            raise distributed.PeerError("rank 0 could not write a checkpoint; see its error", 1)
        return votes

    def outcome(self, step: int, max_steps: int, evaluation_due: bool) -> Outcome:
        """What follows ``step`` (see :func:`decide`). A single process stops as soon as its flag is set;
        under torchrun the ranks stop once they agreed on it at a step, so all stop after the same one."""
        if distributed.active():
            agreed = self.votes is not None and bool(self.votes.stop_code or self.votes.time_up)
        else:
            agreed = self.stop.is_set()
        return decide(step, max_steps, evaluation_due, agreed, self.stop.reason, self.stop.exit_code)

    def _time_is_up(self) -> bool:
        """Rank 0's clock decides for every rank."""
        return time_is_up(self.clock() - self.started, self.time_limit, self.slowest_step, self.last_eval_seconds,
                          self.manager.last_commit_seconds)
