"""The one outcome of each step, the time limit, and the per-step vote in a single process."""

from __future__ import annotations

import torch

from nanoresume.distributed import DistributedEnv
from nanoresume.errors import CheckpointWriteError
from nanoresume.signals import StopFlag
from nanoresume.stopping import CONTINUE, FINISHED, Outcome, StepDecisions, decide, time_is_up

import pytest


def test_a_step_before_max_steps_continues_unless_a_stop_was_agreed():
    assert decide(3, 10, evaluation_due=False, stop_agreed=False, reason=None, exit_code=0) is CONTINUE
    assert decide(3, 10, evaluation_due=True, stop_agreed=True, reason="SIGTERM", exit_code=143) == \
        Outcome("stop", "SIGTERM", 143)


def test_max_steps_with_its_evaluation_done_is_finished_even_if_a_stop_came_too():
    assert decide(10, 10, evaluation_due=False, stop_agreed=False, reason=None, exit_code=0) is FINISHED
    assert decide(10, 10, evaluation_due=False, stop_agreed=True, reason="SIGTERM", exit_code=143) is FINISHED


def test_a_final_evaluation_cut_short_by_a_stop_is_a_stop_so_a_restart_redoes_it():
    assert decide(10, 10, evaluation_due=True, stop_agreed=True, reason="SIGINT", exit_code=130) == \
        Outcome("stop", "SIGINT", 130)


def test_the_time_limit_leaves_room_for_two_steps_an_evaluation_and_two_commits():
    # needed: 2 * 3 + 5 + 2 * 1 + 1 = 14 s
    assert not time_is_up(elapsed=85.9, time_limit=100.0, slowest_step=3.0, last_eval_seconds=5.0,
                          last_commit_seconds=1.0)
    assert time_is_up(elapsed=86.0, time_limit=100.0, slowest_step=3.0, last_eval_seconds=5.0,
                      last_commit_seconds=1.0)
    assert not time_is_up(elapsed=1e9, time_limit=None, slowest_step=0.0, last_eval_seconds=0.0,
                          last_commit_seconds=0.0)


class FakeManager:
    """What StepDecisions reads from a CheckpointManager."""

    def __init__(self, error: Exception | None = None, time_due: bool = False) -> None:
        self.error, self._time_due, self.last_commit_seconds = error, time_due, 0.0

    def poll(self) -> None:
        if self.error is not None:
            raise self.error

    def time_due(self) -> bool:
        return self._time_due


def _decisions(stop: StopFlag, manager: FakeManager, time_limit: float | None = None,
               now: float = 0.0) -> StepDecisions:
    return StepDecisions(stop, DistributedEnv(), manager, time_limit, started=0.0, clock=lambda: now)


def _vote(decisions: StepDecisions, loss: float = 2.0):
    return decisions.vote(torch.tensor(loss), torch.tensor(0.5))


def test_a_single_process_vote_is_its_own_loss_and_flags():
    decisions = _decisions(StopFlag(), FakeManager(time_due=True))
    votes = _vote(decisions)
    assert (votes.loss, votes.grad_norm, votes.stop_code, votes.save_time_due) == (2.0, 0.5, 0, True)
    assert decisions.outcome(1, 10, evaluation_due=False) is CONTINUE


def test_a_stop_flag_set_in_a_single_process_stops_after_this_step():
    stop = StopFlag()
    decisions = _decisions(stop, FakeManager())
    stop.request("SIGTERM", 143)
    assert decisions.outcome(1, 10, evaluation_due=False) == Outcome("stop", "SIGTERM", 143)


def test_the_clock_past_the_time_limit_requests_a_stop_with_exit_75():
    stop = StopFlag()
    votes = _vote(_decisions(stop, FakeManager(), time_limit=10.0, now=9.5))
    assert votes.time_up
    assert (stop.reason, stop.exit_code) == ("time limit", 75)


def test_a_failed_background_save_is_raised_at_the_vote():
    error = CheckpointWriteError("disk full")
    with pytest.raises(CheckpointWriteError, match="disk full"):
        _vote(_decisions(StopFlag(), FakeManager(error=error)))


def test_a_non_finite_loss_is_voted_not_raised_here():
    assert _vote(_decisions(StopFlag(), FakeManager()), loss=float("nan")).any_nonfinite_loss


@pytest.mark.parametrize("async_save", [False, True])
def test_a_stop_that_arrives_during_a_save_ends_the_run_at_that_step(make_config, monkeypatch, async_save):
    from nanoresume.checkpoint import CheckpointManager
    from nanoresume.trainer import Trainer

    save = CheckpointManager.save
    trainer = None

    def save_then_sigterm(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 4:
            trainer.stop.request("SIGTERM", 143)  # as a signal during the write would
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_sigterm)
    trainer = Trainer(make_config(max_steps=10, ckpt_interval=2, eval_interval=100, async_save=async_save))
    result = trainer.run()
    assert (result.step, result.stop_reason, result.exit_code) == (4, "SIGTERM", 143)
    assert result.last_checkpoint is not None and result.last_checkpoint.name == "step_00000004.pt"
