"""Will a run fit? A lower bound on what one process will hold, checked before anything is allocated.

Without it, ``--n-embd 16777216`` or ``--batch-size 1000000000`` passes validation and then
hangs in the allocator or dies in the OOM killer. The bound counts only what must exist on this
process, so a run it refuses surely cannot fit, and one it lets through may still run out of
memory later, as it would anyway:

- **state**: float32 weights, gradients and AdamW's two moments (16 bytes a parameter), whole in
  one process or under DDP, this rank's 1/world shard of them under FSDP;
- **gathered** (FSDP only): the largest unit FSDP gathers whole for its forward and backward (a
  block, or the root's embeddings), float32 weights and gradients;
- **activations**: one micro-batch's at 2 bytes a value, float32 logits and their gradient, and the
  validation batch index.

On the CPU the processes of one machine share its memory, so each is given its share of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .model import parameter_count

_ACTIVATION_VALUES_PER_BLOCK = 12  # per token and per unit of width: qkv 3, attention out 1, MLP 4 + 4
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Need:
    """What one process of a run will hold at least, in bytes."""

    parameters: int  # of the whole model
    world_size: int
    sharded: bool
    state: int  # this process's weights, gradients and optimizer moments
    gathered: int  # FSDP: the largest unit gathered whole at once (0 otherwise)
    activations: int  # activations, logits and their gradient, validation index

    @property
    def total(self) -> int:
        return self.state + self.gathered + self.activations


def unit_parameters(cfg: ModelConfig) -> int:
    """Parameters of the largest unit FSDP gathers whole: one block, or the root (the embeddings and
    the final LayerNorm; the tied output head is the token embedding)."""
    C, bias = cfg.n_embd, int(cfg.bias)
    block = 12 * C * C + 2 * C + 11 * C * bias
    root = cfg.vocab_size * C + cfg.block_size * C + C * (1 + bias)
    return max(block, root)


def need(cfg: TrainConfig, world_size: int = 1, sharded: bool = False) -> Need:
    """A lower bound on what one process of ``cfg`` holds during a step, on ``world_size`` processes,
    its model sharded (FSDP) or not (one process, DDP)."""
    B, T, C = cfg.batch_size, cfg.block_size, cfg.n_embd  # B: per process
    tokens = B * T
    model = cfg.model_config()
    params = parameter_count(model)
    shards = world_size if sharded else 1
    state = 16 * -(-params // shards)  # float32 weights, gradients, exp_avg, exp_avg_sq; ceil: shards pad
    gathered = 8 * unit_parameters(model) if sharded and world_size > 1 else 0
    activations = 2 * tokens * C * _ACTIVATION_VALUES_PER_BLOCK * cfg.n_layer
    logits = 2 * 4 * tokens * cfg.vocab_size  # float32 logits and their gradient
    validation_index = 8 * cfg.eval_iters * B  # one int64 start offset per validation window
    return Need(params, world_size, sharded, state, gathered, activations + logits + validation_index)


def training_bytes(cfg: TrainConfig, world_size: int = 1, sharded: bool = False) -> int:
    """A lower bound on the memory one process needs for a training step of ``cfg`` (see :func:`need`)."""
    return need(cfg, world_size, sharded).total


def available_bytes(device: torch.device, sharing: int = 1) -> Optional[int]:
    """Free memory on ``device`` for one of ``sharing`` processes that share it (for the CPU: available
    RAM, capped by a container's limit); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = [_meminfo_available(), _cgroup_room()]
    known = [c for c in candidates if c is not None]
    return min(known) // max(1, sharing) if known else None


def check_fits(cfg: TrainConfig, device: torch.device, world_size: int = 1, sharded: bool = False,
               local_processes: int = 1) -> None:
    """Raise a one-line :class:`ConfigError` if one process of ``cfg`` surely cannot train on ``device``.
    ``local_processes``: the job's processes on this machine, which share its RAM (a GPU is each one's)."""
    sharing = local_processes if device.type == "cpu" else 1
    available = available_bytes(device, sharing)
    needed = need(cfg, world_size, sharded)
    if available is None or needed.total <= available:
        return
    raise ConfigError(refusal(cfg, needed, device, available, sharing))


def refusal(cfg: TrainConfig, needed: Need, device: torch.device, available: int, sharing: int = 1) -> str:
    """The one line that refuses a run that cannot fit, with the numbers it was judged on."""
    params = needed.parameters
    count = f"{params / 1e9:,.1f}B" if params >= 1e9 else f"{params / 1e6:,.1f}M"
    share = f"its 1/{needed.world_size} shard of the" if needed.sharded and needed.world_size > 1 else "the"
    gathered = f" + {_gb(needed.gathered)} GB of one unit gathered whole" if needed.gathered else ""
    mode = (f"FSDP over {needed.world_size} processes" if needed.sharded and needed.world_size > 1
            else f"DDP over {needed.world_size} processes" if needed.world_size > 1 else "one process")
    room = f"{_gb(available)} GB free" + (f" (its share of {sharing} processes on this machine)" if sharing > 1 else "")
    fix = "lower those flags (use --grad-accum for a larger effective batch)"
    if needed.world_size > 1 and not needed.sharded:
        fix += ", or shard the model with --parallel fsdp"
    return (f"this run needs at least {_gb(needed.total)} GB of memory per process ({mode}: {_gb(needed.state)} GB for "
            f"{share} weights, gradients and optimizer state of {count} parameters{gathered} + "
            f"{_gb(needed.activations)} GB of activations; --n-layer {cfg.n_layer} --n-embd {cfg.n_embd} "
            f"--block-size {cfg.block_size} --batch-size {cfg.batch_size} --eval-iters {cfg.eval_iters}) but "
            f"{device.type} has {room}; {fix}")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f}" if n >= 1e8 else f"{n / 1e9:,.3f}"


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc: total RAM
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_room() -> Optional[int]:
    """A cgroup-v2 memory limit (a container's); None without one. The limit itself, not what is
    left of it: the current usage counts page cache the kernel would give back."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        return None if limit == "max" else int(limit)
    except (OSError, ValueError):
        return None
