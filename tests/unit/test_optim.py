"""Decay groups and the learning rate as a pure function of the step."""

from __future__ import annotations

import pytest
import torch

from nanoresume.config import ModelConfig
from nanoresume.model import GPT
from nanoresume.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_starts_small_and_nonzero_and_reaches_the_peak_at_its_end():
    assert lr_factor(0, warmup_steps=10, max_steps=100, min_ratio=0.1) == pytest.approx(1 / 11)
    assert lr_factor(0, 10, 100, 0.1) > 0
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(10 / 11)
    assert lr_factor(10, 10, 100, 0.1) == 1.0


def test_the_cosine_ends_at_min_ratio_and_stays_there():
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(150, 10, 100, 0.1) == 0.1
    assert lr_factor(100, 0, 100, 0.0) == pytest.approx(0.0)


def test_warmup_rises_and_the_cosine_falls_monotonically():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(0, 101)]
    warmup, decay = factors[:11], factors[10:]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)  # halfway down the cosine


def test_zero_warmup_starts_at_the_peak():
    assert lr_factor(0, 0, 50, 0.2) == 1.0


def test_the_scheduler_sets_the_group_lr_to_peak_times_factor_at_every_step():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, lr=0.5, weight_decay=0.1, betas=(0.9, 0.99))
    scheduler = build_scheduler(optimizer, warmup_steps=3, max_steps=10, min_ratio=0.1)
    for step in range(12):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.5 * lr_factor(step, 3, 10, 0.1))
        optimizer.step()
        scheduler.step()


def test_matrices_and_embeddings_decay_while_biases_and_layernorm_do_not():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    undecayed = {by_id[id(p)] for p in no_decay["params"]}
    assert {"wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight"} <= decayed
    assert {"blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.attn.qkv.bias", "ln_f.weight"} <= undecayed
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") for n in undecayed)


def test_every_parameter_is_in_exactly_one_group_including_the_tied_matrix_once():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_parameters()


def test_lr_betas_and_weight_decay_reach_the_optimizer():
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.05, betas=(0.8, 0.95))
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (1e-3, (0.8, 0.95), 0.05), (1e-3, (0.8, 0.95), 0.0)]
