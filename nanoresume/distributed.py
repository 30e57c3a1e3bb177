"""Distributed facts, derived once from torchrun's environment, and the few collectives the loop needs.

Nothing else in nanoresume reads ``RANK`` / ``WORLD_SIZE``. Plain ``python scripts/train.py``
is a single process with no process group: every helper here is then a local no-op, so the
single-process loop pays nothing for distributed support. Under torchrun, each rank uses
``cuda:LOCAL_RANK`` (nccl) or the CPU (gloo).

Decisions that must be the same on every rank (stop, a non-finite loss, the time limit, a
failed background save, a time-based save) are made by :func:`agree`: one small
all-gather per step, after which every rank reads the same numbers.

Every collective here runs inside :func:`collective`, which turns the error a backend raises when
another process of the job died (gloo's ``Connection closed by peer``, nccl's remote errors,
``DistError``, timeouts) into one :class:`LostPeerError` line naming the site; any other error
keeps its traceback. Under ``torchrun --max-restarts`` the process group is started on a store
of its own for each restart (:func:`restart_store`): torchrun hands every restart the same
store, and the previous group's addresses in it would make the new workers wait forever.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from .console import LOGGER_NAME
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
    local_world_size: int = 1  # torchrun's processes on this machine, which share its RAM

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
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers; launch with torchrun") \
            from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not below WORLD_SIZE {world}; launch with torchrun")
    return DistributedEnv(rank=rank, local_rank=local, world_size=world, launched=True,
                          local_world_size=local_world)


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
        store = restart_store(env, os.environ)
        if store is not None:
            kwargs.update(store=store, rank=env.rank, world_size=env.world_size)
        with collective("start-up (joining the process group)"):
            dist.init_process_group(**kwargs)
        self.started = True

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False


def restart_count(environ: "os._Environ[str] | dict[str, str]") -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``): 0 on the first start."""
    try:
        return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def max_restarts(environ: "os._Environ[str] | dict[str, str]") -> Optional[int]:
    """torchrun's ``--max-restarts``, if it says."""
    try:
        return int(environ["TORCHELASTIC_MAX_RESTARTS"])
    except (KeyError, ValueError):
        return None


def restart_store_prefix(environ: "os._Environ[str] | dict[str, str]") -> Optional[str]:
    """The key prefix that keeps one restart's process group apart from the last one's, or None when
    torchrun's default needs none.

    torchrun's agent hosts one store for the whole job (``TORCHELASTIC_USE_AGENT_STORE``) and every
    restart's workers join it without a prefix of their own: the new group reads the dead group's
    addresses and waits for peers that no longer exist. The restart count tells the groups apart,
    but only where one agent counts for every worker (``GROUP_WORLD_SIZE`` 1: one machine, or the
    survivor of an elastic job); several agents count on their own, and there torch's
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a new store each round) is the fix (docs/elastic.md).
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
        return None
    return f"nanoresume/restart_{restart_count(environ)}/world_{environ.get('WORLD_SIZE', '1')}"


def restart_store(env: DistributedEnv, environ: "os._Environ[str] | dict[str, str]") -> Any:
    """A client of torchrun's store with :func:`restart_store_prefix`, or None (torch's own store)."""
    prefix = restart_store_prefix(environ)
    if prefix is None:
        return None
    with collective("start-up (reaching torchrun's store)"):
        store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size, is_master=False,
                              timeout=COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(prefix, store)


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


def barrier(site: str = "a barrier") -> None:
    if active():
        with collective(site):
            dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable, small)."""
    if not active():
        return obj
    box = [obj]
    with collective("the resume broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> Optional[list[T]]:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
    if not active():
        return [obj]
    rank = dist.get_rank()
    out: Optional[list[Any]] = [None] * dist.get_world_size() if rank == 0 else None
    with collective("the checkpoint gather"):
        dist.gather_object(obj, out, dst=0)
    return out


def all_gather_rows(values: torch.Tensor, site: str = "the per-step vote") -> torch.Tensor:
    """(world_size, n): row r is rank r's ``values`` (a 1-D float64 tensor), on every rank."""
    if not active():
        return values.unsqueeze(0)
    out = torch.empty(dist.get_world_size() * values.numel(), dtype=values.dtype, device=values.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.11
    with collective(site):
        gather(out, values)
    return out.view(dist.get_world_size(), -1)


def all_sum(values: torch.Tensor, site: str = "evaluation") -> torch.Tensor:
    """Element-wise sum over ranks (in place, returned)."""
    if active():
        with collective(site):
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
    with collective("start-up (sharing each rank's outcome)"):
        dist.all_gather_object(everyone, summary)
    failed = [(rank, s) for rank, s in enumerate(everyone) if s is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (kind, message, exit_code) = failed[0]
    raise PeerError(f"rank {rank} failed: {message}", exit_code)


# What gloo and nccl raise (as a plain RuntimeError) when the process at the other end is gone, and
# nothing else: a RuntimeError of any other kind is a bug and keeps its traceback.
_LOST_PEER_PATTERNS = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Connection refused|remote worker crash|"
    r"timed out connecting|Timed out waiting \d+ ?ms for (recv|send)|[Tt]imed out .*(recv|send|connect)|"
    r"NCCL communicator was aborted|ncclRemoteError|remote process exited|Socket Timeout|"
    r"failed to (recv|send|connect)|ProcessGroup.* (timeout|Timeout)|Watchdog caught collective operation timeout")
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is what a collective raises when another process of the job died or stopped
    answering: any ``DistError`` (store, network, timeouts), or a backend RuntimeError of those shapes."""
    if isinstance(error, LostPeerError):
        return True
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and _LOST_PEER_PATTERNS.search(str(error)) is not None


def lost_peer_error(error: BaseException, site: Optional[str] = None) -> Optional["LostPeerError"]:
    """A one-line error for a collective that failed because another process died, else None."""
    if isinstance(error, LostPeerError):
        return error
    if not is_lost_peer(error):
        return None
    rank, world = _rank_and_world()
    return LostPeerError(lost_peer_message(rank, world, site, str(error)))


def lost_peer_message(rank: Optional[int], world: Optional[int], site: Optional[str], raised: str) -> str:
    """The one line a surviving rank prints (pure: the rank, the world size, where, and what was raised)."""
    me = f"rank {rank}" if rank is not None else "this process"
    if rank is not None and world == 2:
        peer = f"rank {1 - rank}"
    else:
        address = _PEER_ADDRESS.search(raised)
        peer = f"the process at {address.group(1)}:{address.group(2)}" if address else "another process of this job"
    where = f" during {site}" if site else ""
    cause = next((line.strip() for line in raised.splitlines() if line.strip()), "no detail")
    cause = re.sub(r"^\[[^\]]*\.(cc|cpp|hpp):\d+\]\s*", "", cause).split(". ")[0][:160]  # the first sentence
    return (f"{me} lost contact with {peer}{where}: it died or was killed ({cause}). The last committed "
            f"checkpoint is intact: rerun with --resume auto (torchrun --max-restarts does that by itself)")


def _rank_and_world() -> tuple[Optional[int], Optional[int]]:
    try:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # the group is half torn down; the message then names no rank
        pass
    env = detect()
    return (env.rank, env.world_size) if env.launched else (None, None)


@contextmanager
def collective(site: str) -> Iterator[None]:
    """Run one collective (``with collective("the checkpoint gather"): ...``): if another process of the
    job is gone, report and raise one :class:`LostPeerError` naming ``site``; any other error passes
    unchanged."""
    try:
        yield
    except Exception as error:
        lost = lost_peer_error(error, site)
        if lost is None:
            raise
        raise report(lost) from None


def report(lost: "LostPeerError") -> "LostPeerError":
    """Log ``lost``'s line now, once, on this rank, and return it. Now, not when the error reaches the
    command: torchrun SIGTERMs the survivors a moment after a death, and a signal during the teardown
    on the way there ends the process at once (see :mod:`nanoresume.signals`), which would lose the line."""
    if not lost.reported:
        lost.reported = True
        logging.getLogger(LOGGER_NAME).error(str(lost))
    return lost


class PeerError(NanoresumeError):
    """Another rank failed; this one stops with the same exit code (rank 0 reports the cause)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LostPeerError(PeerError):
    """Another process of the job died or stopped answering in a collective (exit 1). Every surviving
    rank says so, not just rank 0: which rank survives is not known in advance."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 1)
        self.reported = False  # its line is logged already (:func:`report`)


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
