"""Will a run fit? A lower bound on its memory, checked before anything is allocated.

Without it, ``--n-embd 16777216`` or ``--batch-size 1000000000`` passes validation and then
hangs in the allocator or dies in the OOM killer. The bound counts only what must exist
(weights, gradients and AdamW's two moments in float32; the activations of one micro-batch
at 2 bytes a value; the logits; the validation batch index), so a run it refuses surely
cannot fit, and one it lets through may still run out of memory later, as it would anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig
from .errors import ConfigError
from .model import parameter_count

_ACTIVATION_VALUES_PER_BLOCK = 12  # per token and per unit of width: qkv 3, attention out 1, MLP 4 + 4
_CGROUP = Path("/sys/fs/cgroup")


def training_bytes(cfg: TrainConfig) -> int:
    """A lower bound on the memory one training step of ``cfg`` needs."""
    B, T, C = cfg.batch_size, cfg.block_size, cfg.n_embd
    tokens = B * T
    state = 16 * parameter_count(cfg.model_config())  # float32 weights, gradients, exp_avg, exp_avg_sq
    activations = 2 * tokens * C * _ACTIVATION_VALUES_PER_BLOCK * cfg.n_layer
    logits = 2 * 4 * tokens * cfg.vocab_size  # float32 logits and their gradient
    validation_index = 8 * cfg.eval_iters * B  # one int64 start offset per validation window
    return state + activations + logits + validation_index


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (for the CPU: available RAM, capped by a container's limit); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = [_meminfo_available(), _cgroup_room()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def check_fits(cfg: TrainConfig, device: torch.device) -> None:
    """Raise a one-line :class:`ConfigError` if ``cfg`` surely cannot train on ``device``."""
    available = available_bytes(device)
    needed = training_bytes(cfg)
    if available is None or needed <= available:
        return
    params = parameter_count(cfg.model_config())
    count = f"{params / 1e9:,.1f}B" if params >= 1e9 else f"{params / 1e6:,.1f}M"
    raise ConfigError(
        f"this run needs at least {needed / 1e9:,.1f} GB of memory ({count} parameters; "
        f"--n-layer {cfg.n_layer} --n-embd {cfg.n_embd} --block-size {cfg.block_size} --batch-size "
        f"{cfg.batch_size} --eval-iters {cfg.eval_iters}) but {device.type} has {available / 1e9:,.1f} GB "
        f"free; lower those flags (use --grad-accum for a larger effective batch)")


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
