"""The trainer's named parts: saved into one training state and restored from it, in one process."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nanoresume.compare import first_difference
from nanoresume.config import TrainConfig, resolve_config
from nanoresume.data import BatchSampler
from nanoresume.distributed import DistributedEnv
from nanoresume.errors import CheckpointError, NonFiniteLossError
from nanoresume.model import GPT
from nanoresume.optim import build_optimizer, build_scheduler
from nanoresume.training_parts import NonFiniteWeightsError, TrainingParts

CFG = resolve_config(TrainConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, batch_size=2, max_steps=10))
DATA = SimpleNamespace(train=np.zeros(100), fingerprint="f" * 64, source="tiny")


def _parts(seed: int, warnings: list[str]) -> TrainingParts:
    torch.manual_seed(seed)
    model = GPT(CFG.model_config())
    optimizer = build_optimizer(model, CFG.lr, CFG.weight_decay, (CFG.beta1, CFG.beta2))
    scheduler = build_scheduler(optimizer, CFG.warmup_steps, CFG.max_steps, CFG.min_lr_ratio)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sampler = BatchSampler(100, CFG.block_size, 2, seed=CFG.seed)
    return TrainingParts(CFG, DistributedEnv(), DATA, model, optimizer, scheduler, scaler, sampler, sharded=False,
                         warn=warnings.append)


def _train_a_step(parts: TrainingParts) -> None:
    x = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    _, loss = parts.model(x, x)
    loss.backward()
    parts.optimizer.step()
    parts.scheduler.step()
    parts.sampler.next_micro_batches(0, 1, 1)
    parts.counters.step += 1


def test_a_state_loaded_into_other_parts_makes_them_the_same_bit_for_bit():
    saved = _parts(seed=1, warnings=[])
    _train_a_step(saved)
    state = saved.state_dict()
    warnings: list[str] = []
    restored = _parts(seed=2, warnings=warnings)
    restored.load(Path("step_00000001.pt"), state)
    assert first_difference(restored.state_dict(), state) is None
    assert restored.counters.step == 1 and warnings == []


def test_a_state_of_other_data_is_refused_naming_both_fingerprints():
    state = _parts(seed=1, warnings=[]).state_dict()
    state["data"]["fingerprint"] = "0" * 64
    with pytest.raises(CheckpointError, match="fingerprint 000000000000 in the checkpoint, ffffffffffff for tiny"):
        _parts(seed=1, warnings=[]).load(Path("x.pt"), state)


def test_weights_that_went_nan_are_never_saved():
    parts = _parts(seed=1, warnings=[])
    with torch.no_grad():
        parts.model.wte.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="parameter wte.weight holds NaN/inf at step 0") as caught:
        parts.checkpoint(folder=False)
    assert isinstance(caught.value, NonFiniteLossError)  # what callers caught before
