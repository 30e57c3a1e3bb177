"""The per-step vote (:func:`nanoresume.distributed.agree`) with a fake all-gather: every rank gets the
same decisions, whatever its own votes were."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoresume import distributed
from nanoresume.errors import UserError


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


# ---- a peer's death -------------------------------------------------------------------------------

GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:7377. This is typically caused by a remote worker crashing. Check the logs")
GLOO_RESET = "[../gloo/transport/tcp/pair.cc:534] Read error [10.0.0.7]:41212: Connection reset by peer"


def test_what_gloo_nccl_and_torch_raise_for_a_dead_peer_is_recognised_and_a_bug_is_not():
    lost = [RuntimeError(GLOO_CLOSED), RuntimeError(GLOO_RESET),
            RuntimeError("[pair.cc:446] Timed out waiting 1800000ms for recv operation to complete"),
            RuntimeError("NCCL communicator was aborted on rank 1"),
            RuntimeError("NCCL error: remote process exited or there was a network error, ncclRemoteError"),
            torch.distributed.DistError("anything the store says"),
            torch.distributed.DistNetworkError("failed to recv, got 0 bytes")]
    bugs = [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 16x32)"), ValueError(GLOO_CLOSED),
            RuntimeError("Expected all tensors to be on the same device")]
    assert all(distributed.is_lost_peer(e) for e in lost)
    assert not any(distributed.is_lost_peer(e) for e in bugs)


def test_the_lost_peer_line_names_both_ranks_the_site_the_first_sentence_and_the_fix():
    line = distributed.lost_peer_message(0, 2, "the checkpoint gather", GLOO_CLOSED)
    assert line == ("rank 0 lost contact with rank 1 during the checkpoint gather: it died or was killed "
                    "(Connection closed by peer [127.0.0.1]:7377). The last committed checkpoint is intact: rerun "
                    "with --resume auto (torchrun --max-restarts does that by itself)")
    many = distributed.lost_peer_message(3, 8, None, GLOO_RESET)
    assert many.startswith("rank 3 lost contact with the process at 10.0.0.7:41212: it died or was killed (Read error")
    assert "\n" not in distributed.lost_peer_message(None, None, "evaluation", "line one\nline two")


def test_a_collective_turns_a_dead_peer_into_one_error_and_lets_a_bug_through():
    with pytest.raises(distributed.LostPeerError, match="during the per-step vote"):
        with distributed.collective("the per-step vote"):
            raise RuntimeError(GLOO_CLOSED)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with distributed.collective("the per-step vote"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    error = distributed.LostPeerError("rank 1 lost contact with rank 0")
    assert distributed.lost_peer_error(error) is error and error.exit_code == 1


def test_each_torchrun_restart_joins_the_agent_s_store_under_a_prefix_of_its_own():
    agent = dict(TORCHELASTIC_USE_AGENT_STORE="True", GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT="29500", WORLD_SIZE="2", TORCHELASTIC_RESTART_COUNT="0")
    first = distributed.restart_store_prefix(agent)
    second = distributed.restart_store_prefix(dict(agent, TORCHELASTIC_RESTART_COUNT="1"))
    shrunk = distributed.restart_store_prefix(dict(agent, TORCHELASTIC_RESTART_COUNT="1", WORLD_SIZE="1"))
    assert None not in (first, second, shrunk) and len({first, second, shrunk}) == 3
    # several agents count restarts each on its own: no prefix (torch's own switch is documented instead)
    assert distributed.restart_store_prefix(dict(agent, GROUP_WORLD_SIZE="2")) is None
    assert distributed.restart_store_prefix(dict(agent, TORCHELASTIC_USE_AGENT_STORE="False")) is None
    assert distributed.restart_store_prefix({}) is None
    assert distributed.restart_count({}) == 0 and distributed.max_restarts({}) is None
    assert distributed.max_restarts({"TORCHELASTIC_MAX_RESTARTS": "3"}) == 3


def test_the_train_command_prints_a_lost_peer_in_one_line_on_any_rank_and_exits_1(monkeypatch, capsys, tmp_path):
    """DDP's all-reduce in backward fails outside any guarded site: the command still says it in one line,
    on rank 1 too (rank 0 may be the one that died), and keeps the traceback of anything else."""
    from nanoresume import trainer
    from nanoresume.tools import cli

    def failing(error: Exception):
        class Trainer:
            def __init__(self, *args, **kwargs):
                raise error
        return Trainer

    monkeypatch.setenv("RANK", "1")
    (tmp_path / "x.txt").write_text("some text to train on " * 50)
    argv = ["--data", str(tmp_path / "x.txt"), "--out-dir", str(tmp_path / "out")]
    monkeypatch.setattr(trainer, "Trainer", failing(RuntimeError(GLOO_CLOSED)))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lost contact with" in err and "Traceback" not in err, err
    monkeypatch.setattr(trainer, "Trainer", failing(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main(argv)


@pytest.mark.slow
def test_a_peer_killed_before_each_collective_is_one_lost_peer_error_naming_the_site(tmp_path):
    """Real gloo, two forked processes per site: the vote, the checkpoint gather, evaluation's sum, the
    resume broadcast and a barrier (the whole command's line: tests/integration/test_peer_death.py)."""
    script = Path(__file__).resolve().parents[1] / "harness" / "site_deaths.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert set(reports) == {"the per-step vote", "the checkpoint gather", "evaluation", "the resume broadcast",
                            "a barrier"}
    for site, (kind, message) in reports.items():
        assert kind == "LostPeerError", (site, kind, message)
        survivor = 1 if site in ("the resume broadcast", "a barrier") else 0
        assert message.startswith(f"rank {survivor} lost contact with rank {1 - survivor} during {site}: "), message


def test_torchrun_s_environment_is_read_once_into_where_this_process_sits(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect() == distributed.DistributedEnv()  # a plain process: rank 0 of 1, no torchrun
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two processes, which share each one's RAM
    assert distributed.detect() == distributed.DistributedEnv(rank=3, local_rank=1, world_size=4, launched=True,
                                                              local_world_size=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(UserError, match="LOCAL_WORLD_SIZE must be integers; launch with torchrun"):
        distributed.detect()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK 4 is not below WORLD_SIZE 4"):
        distributed.detect()
