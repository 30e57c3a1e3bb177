"""AdamW with decay / no-decay groups, the learning rate as a pure function of the step, and the
optimizer's state keyed by parameter number (``torch.save`` files) or by name (checkpoint folders)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """Matrices (and embeddings) decay; biases and LayerNorm weights do not."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine down to ``min_ratio``.

    Step 0 gets a small non-zero LR so the first update is not wasted.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (so it has a state dict) around :func:`lr_factor`."""
    schedule = functools.partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Re-apply the current flags after loading a checkpoint, which restores the saved hyperparameters.

    A no-op, bit for bit, when they did not change; groups are (decay, no decay) as built by
    :func:`build_optimizer`.
    """
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, decays in zip(optimizer.param_groups, (True, False)):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
        group["betas"] = betas
        group["weight_decay"] = weight_decay if decays else 0.0


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the order ``Optimizer.state_dict()`` numbers them (0, 1, ...),
    which is the same on every rank and under DDP, FSDP or one process."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An ``Optimizer.state_dict()`` keyed by parameter name instead of number: the layout of
    ``torch.distributed.checkpoint.state_dict``, which any sharding can load."""
    return {
        "state": {names[index]: entry for index, entry in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def indexed_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`named_optimizer_state`; ValueError naming a parameter the model lacks."""
    index = {name: i for i, name in enumerate(names)}

    def number(name: str) -> int:
        if name not in index:
            raise ValueError(f"state for parameter {name!r}, which the model does not have")
        return index[name]

    return {
        "state": {number(name): entry for name, entry in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [number(n) for n in group["params"]]} for group in state["param_groups"]],
    }
