"""Everything a training step needs, built for one rank: the model as it trains (sharded, compiled,
wrapped for DDP as asked), its optimizer, schedule and gradient scaler, the batch order, the fixed
validation batches, and the named stateful parts a checkpoint saves.

The model is built on the meta device and sharded before any rank allocates, then each rank fills
only what it holds: initial weights are keyed by (seed, parameter name), the same in every layout
and world size, and drawing them takes nothing from the global random streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed, parallel
from .config import TrainConfig
from .data import BatchSampler, eval_offsets
from .distributed import DistributedEnv
from .model import GPT, materialize, shapes_only
from .optim import build_optimizer, build_scheduler
from .state import seed_everything, seed_rank_streams
from .training_parts import TrainingParts


@dataclass
class StepParts:
    raw_model: GPT  # the model itself: its parameters, state and sampling
    model: torch.nn.Module  # what a training step calls: compiled and/or wrapped for DDP
    eval_model: torch.nn.Module  # never the DDP wrapper: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    val_batches: list[np.ndarray]  # each evaluation's window offsets, the same every time
    parts: TrainingParts


def build_step_parts(cfg: TrainConfig, env: DistributedEnv, device: torch.device, dtype: torch.dtype,
                     data: Any, sharded: bool, warn: Callable[[str], None]) -> StepParts:
    """Seed the streams (rank 0 keeps the plain seed; dropout differs between ranks), then build."""
    seed_everything(cfg.seed)
    seed_rank_streams(cfg.seed, env.rank)
    model = shapes_only(cfg.model_config())
    if sharded:
        parallel.shard(model, model.blocks, device, env.world_size, dtype)
    raw_model = materialize(model, device, cfg.seed)
    compiled = torch.compile(raw_model) if cfg.compile else raw_model
    if distributed.active() and not sharded:
        wrapped = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = compiled
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sampler = BatchSampler(len(data.train), cfg.block_size, cfg.global_batch(env.world_size), cfg.seed)
    val_batches = eval_offsets(len(data.val), cfg.block_size, cfg.eval_iters, cfg.batch_size)
    parts = TrainingParts(cfg, env, data, raw_model, optimizer, scheduler, scaler, sampler, sharded, warn)
    return StepParts(raw_model, wrapped, compiled, optimizer, scheduler, scaler, sampler, val_batches, parts)
