"""The per-step vote (:func:`nanoresume.distributed.agree`) with a fake all-gather: every rank gets the
same decisions, whatever its own votes were."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from nanoresume import distributed


def vote(loss: float, **flags: Any) -> dict[str, Any]:
    """One rank's arguments to ``agree`` (its mean loss as float64, so sums are easy to predict)."""
    return dict(dict(stop_code=0, time_up=False, save_time_due=False, save_failed=False), **flags,
                loss=torch.tensor(loss, dtype=torch.float64))


def agree(monkeypatch: pytest.MonkeyPatch, votes: list[dict[str, Any]],
          grad_norm: float = 1.5) -> list[distributed.StepVotes]:
    """Each rank's result of ``agree``, as if ranks 0, 1, ... had voted ``votes`` together: a fake
    all-gather first collects the row each rank sends, then hands every rank all the rows."""
    sent: list[torch.Tensor] = []

    def each_rank_agrees() -> list[distributed.StepVotes]:
        return [distributed.agree(grad_norm=torch.tensor(grad_norm), **v) for v in votes]

    monkeypatch.setattr(distributed, "all_gather_rows", lambda mine: sent.append(mine.clone()) or mine[None])
    each_rank_agrees()
    monkeypatch.setattr(distributed, "all_gather_rows", lambda mine: torch.stack(sent))
    return each_rank_agrees()


def test_every_rank_gets_the_same_decisions_from_different_votes(monkeypatch):
    results = agree(monkeypatch, [vote(2.0), vote(3.0, stop_code=143), vote(4.0, time_up=True, save_failed=True)])
    assert results[0] == results[1] == results[2]
    assert results[0].loss == 3.0 and results[0].grad_norm == 1.5


def test_the_loss_is_the_mean_over_ranks_summed_in_rank_order_on_every_rank(monkeypatch):
    losses = [0.1, 0.2, 0.3, 1e-17]  # float addition is not associative: the order must be fixed
    [first, *rest] = agree(monkeypatch, [vote(value) for value in losses])
    total = 0.0
    for value in losses:
        total += value
    assert first.loss == total / 4 and all(result.loss == first.loss for result in rest)


def test_a_stop_asked_by_any_rank_is_every_rank_s_stop_with_the_highest_code(monkeypatch):
    results = agree(monkeypatch, [vote(1.0), vote(1.0, stop_code=143), vote(1.0, stop_code=75)])
    assert [result.stop_code for result in results] == [143, 143, 143]
    assert [result.stop_code for result in agree(monkeypatch, [vote(1.0), vote(1.0)])] == [0, 0]


def test_rank_0_s_clock_and_save_decide_for_every_rank(monkeypatch):
    others_say = vote(1.0, time_up=True, save_time_due=True, save_failed=True)
    for result in agree(monkeypatch, [vote(1.0), others_say]):
        assert (result.time_up, result.save_time_due, result.save_failed) == (False, False, False)
    for result in agree(monkeypatch, [others_say, vote(1.0)]):
        assert (result.time_up, result.save_time_due, result.save_failed) == (True, True, True)


def test_a_non_finite_loss_on_one_rank_is_seen_by_every_rank(monkeypatch):
    for bad in (math.nan, math.inf):
        results = agree(monkeypatch, [vote(1.0), vote(bad)])
        assert all(result.any_nonfinite_loss for result in results)
    assert not any(result.any_nonfinite_loss for result in agree(monkeypatch, [vote(1.0), vote(2.0)]))


def test_one_process_needs_no_collective_and_keeps_its_own_numbers():
    result = distributed.agree(torch.tensor(2.5), torch.tensor(0.5), stop_code=130, time_up=True,
                               save_time_due=False, save_failed=True)
    assert result == distributed.StepVotes(loss=2.5, grad_norm=0.5, any_nonfinite_loss=False, stop_code=130,
                                           time_up=True, save_time_due=False, save_failed=True)
