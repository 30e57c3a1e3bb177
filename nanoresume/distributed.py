"""Distributed facts, derived once from torchrun's environment, and the few collectives the loop needs.

Nothing else in nanoresume reads ``RANK`` / ``WORLD_SIZE``. Plain ``python scripts/train.py``
is a single process with no process group: every helper here is then a local no-op, so the
single-process loop pays nothing for distributed support. Under torchrun, each rank uses
``cuda:LOCAL_RANK`` (nccl) or the CPU (gloo).

Decisions that must be the same on every rank (stop, a non-finite loss, the time limit, a
failed background save, a time-based save) are made by :func:`agree`: one small
all-gather per step, after which every rank reads the same numbers.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import NanoresumeError, UserError

T = TypeVar("T")
# Long enough for a slow rank 0 to verify a large checkpoint or commit a save while the others
# wait at a barrier; short enough that a lost rank ends the job rather than hanging it forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun (even with one process): a process group is used

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and takes OUT's lock."""
        return self.rank == 0


def detect() -> DistributedEnv:
    """The environment torchrun sets, or a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedEnv()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not below WORLD_SIZE {world}; launch with torchrun")
    return DistributedEnv(rank=rank, local_rank=local, world_size=world, launched=True)


class ProcessGroup:
    """Starts the default process group for ``env`` (if launched by torchrun) and ends it on close."""

    def __init__(self, env: DistributedEnv, device: torch.device) -> None:
        self.env = env
        self.started = False
        if not env.launched or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": COLLECTIVE_TIMEOUT}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        self.started = True

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def new_group() -> Any:
    """A gloo process group of every rank, for the collectives of checkpoint-folder writes: they may
    run on the writer thread while training's own collectives run on the default group. None
    without a process group (one process, which needs no collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def default_group() -> Any:
    """The default process group, or None without one."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable, small)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> Optional[list[T]]:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
    if not active():
        return [obj]
    rank = dist.get_rank()
    out: Optional[list[Any]] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """(world_size, n): row r is rank r's ``values`` (a 1-D float64 tensor), on every rank."""
    if not active():
        return values.unsqueeze(0)
    out = torch.empty(dist.get_world_size() * values.numel(), dtype=values.dtype, device=values.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.11
    gather(out, values)
    return out.view(dist.get_world_size(), -1)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place, returned)."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def raise_if_any_failed(error: Optional[BaseException]) -> None:
    """Collective: if any rank hit an error, every rank raises (the lowest failing rank's message).

    A rank that fails alone while the others wait in a collective would hang the job; this
    turns a one-rank failure (a file rank 1 cannot read, say) into the same exit on every rank.
    """
    if not active():
        if error is not None:
            raise error
        return
    summary = None if error is None else (type(error).__name__, str(error), getattr(error, "exit_code", 1))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, summary)
    failed = [(rank, s) for rank, s in enumerate(everyone) if s is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (kind, message, exit_code) = failed[0]
    raise PeerError(f"rank {rank} failed: {message}", exit_code)


def lost_peer_error(error: BaseException) -> Optional["PeerError"]:
    """A one-line error for a collective that failed because another process died, else None."""
    if not isinstance(error, getattr(dist, "DistError", ())):
        return None
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return PeerError(f"lost contact with another process of this job (it died or was killed): {first_line}; "
                     f"the last committed checkpoint is intact, rerun with --resume auto", 1)


class PeerError(NanoresumeError):
    """Another rank failed; this one stops with the same exit code (rank 0 reports the cause)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class StepVotes:
    """One optimizer step's decisions, identical on every rank."""

    loss: float  # mean over ranks of each rank's mean micro-batch loss (the global batch's loss)
    grad_norm: float  # the same on every rank: gradients are all-reduced before clipping
    any_nonfinite_loss: bool
    stop_code: int  # the highest exit code any rank's stop request asked for; 0 if none did
    time_up: bool  # rank 0's clock says --time-limit is near
    save_time_due: bool  # rank 0's clock says --ckpt-minutes have passed
    save_failed: bool  # rank 0's background checkpoint write failed


_VOTE_FIELDS = 5  # loss, stop code, time up, save due, save failed


def agree(loss: torch.Tensor, grad_norm: torch.Tensor, stop_code: int, time_up: bool, save_time_due: bool,
          save_failed: bool) -> StepVotes:
    """This step's decisions from every rank's votes: one all-gather of five numbers per rank, and
    one device sync for everything (the loss and the norm are read in the same transfer).

    Single process: no collective, the same arithmetic, so the result is the same as before
    distributed support existed.
    """
    flags = torch.tensor([stop_code, time_up, save_time_due, save_failed], dtype=torch.float64)
    mine = torch.cat([loss.detach().double().reshape(1), flags.to(loss.device, non_blocking=True)])
    rows = all_gather_rows(mine)
    values = torch.cat([rows.reshape(-1), grad_norm.detach().double().reshape(1)]).tolist()
    per_rank = [values[r * _VOTE_FIELDS:(r + 1) * _VOTE_FIELDS] for r in range(rows.shape[0])]
    losses = [row[0] for row in per_rank]
    total = 0.0
    for value in losses:  # in rank order: the same float on every rank
        total += value
    return StepVotes(
        loss=total / len(losses), grad_norm=values[-1],
        any_nonfinite_loss=not all(math.isfinite(v) for v in losses),
        stop_code=int(max(row[1] for row in per_rank)),
        time_up=bool(per_rank[0][2]), save_time_due=bool(per_rank[0][3]), save_failed=bool(per_rank[0][4]))
