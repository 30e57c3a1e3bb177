"""A size that cannot fit is refused in one line before anything is allocated; real sizes pass; each
process counts what it will hold (its shard under FSDP)."""

from __future__ import annotations

import pytest
import torch

from nanoresume import memory
from nanoresume.config import TrainConfig, resolve_config
from nanoresume.errors import ConfigError
from nanoresume.model import parameter_count

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, named", [
    (dict(n_embd=2**24), "--n-embd 16777216"),
    (dict(n_layer=10**6), "--n-layer 1000000"),
    (dict(batch_size=10**9), "--batch-size 1000000000"),
    (dict(eval_iters=10**12), "--eval-iters 1000000000000"),
])
def test_a_run_that_cannot_fit_in_memory_is_refused_in_one_line_naming_its_sizes(flags, named):
    with pytest.raises(ConfigError) as info:
        memory.check_fits(resolve_config(TrainConfig(**flags), check=False), CPU)  # past the flags' own ranges
    message = str(info.value)
    assert named in message and "GB of memory" in message and "free" in message and "\n" not in message


def test_a_billion_parameter_model_is_let_through_where_the_memory_is_there(monkeypatch):
    cfg = resolve_config(TrainConfig(n_layer=24, n_head=16, n_embd=2048, block_size=1024, batch_size=8))
    assert 1.2e9 < parameter_count(cfg.model_config()) < 1.3e9
    monkeypatch.setattr(memory, "available_bytes", lambda device, sharing=1: 80 * 10**9)  # an 80 GB GPU
    memory.check_fits(cfg, torch.device("cuda"))
    monkeypatch.setattr(memory, "available_bytes", lambda device, sharing=1: 8 * 10**9)
    with pytest.raises(ConfigError, match="1.2B parameters"):
        memory.check_fits(cfg, torch.device("cuda"))


def test_the_presets_fit_this_machine_and_unknown_memory_refuses_nothing(monkeypatch):
    available = memory.available_bytes(CPU)
    for preset in ("cpu", "gpu10m"):
        cfg = resolve_config(TrainConfig(preset=preset))
        assert available is None or memory.training_bytes(cfg) <= available
        memory.check_fits(cfg, CPU)
    huge = resolve_config(TrainConfig(n_embd=2**24))
    assert memory.training_bytes(huge) > 10**15  # refused wherever the memory is known
    monkeypatch.setattr(memory, "available_bytes", lambda device, sharing=1: None)
    assert memory.check_fits(huge, CPU) is None  # let through, no error


WIDE = dict(n_layer=4, n_head=8, n_embd=1024, block_size=64, batch_size=1, eval_iters=1)


def test_under_fsdp_a_rank_counts_its_shard_of_the_state_and_one_unit_gathered_whole():
    cfg = resolve_config(TrainConfig(**WIDE))
    params = parameter_count(cfg.model_config())
    alone, ddp, fsdp = memory.need(cfg), memory.need(cfg, 2, sharded=False), memory.need(cfg, 3, sharded=True)
    assert alone.state == ddp.state == 16 * params and alone.gathered == ddp.gathered == 0
    assert fsdp.state == 16 * -(-params // 3)  # weights, gradients and AdamW's two moments, a third each
    block = 12 * 1024**2 + 2 * 1024 + 11 * 1024  # the largest unit: one block (qkv, proj, MLP, LayerNorms, biases)
    assert memory.unit_parameters(cfg.model_config()) == block and fsdp.gathered == 8 * block
    assert fsdp.activations == alone.activations  # --batch-size is per process in every mode
    assert fsdp.total == fsdp.state + fsdp.gathered + fsdp.activations == memory.training_bytes(cfg, 3, True)
    assert fsdp.total < 0.5 * ddp.total  # what sharding is for
    assert memory.need(cfg, 1, sharded=True).gathered == 0  # one rank: nothing to gather


def test_a_run_that_fits_only_when_sharded_is_let_through_under_fsdp_and_refused_under_ddp(monkeypatch):
    cfg = resolve_config(TrainConfig(**WIDE))
    room = (memory.training_bytes(cfg, 2, sharded=True) + memory.training_bytes(cfg, 2)) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device, sharing=1: room)
    memory.check_fits(cfg, CPU, 2, sharded=True)
    with pytest.raises(ConfigError) as info:
        memory.check_fits(cfg, CPU, 2, sharded=False)
    message = str(info.value)
    need = memory.need(cfg, 2)
    assert "\n" not in message and "DDP over 2 processes" in message and "--parallel fsdp" in message
    assert f"needs at least {need.total / 1e9:,.1f} GB of memory per process" in message
    assert f"{need.state / 1e9:,.1f} GB for the weights, gradients and optimizer state of 50.7M" in message
    sharded = memory.refusal(cfg, memory.need(cfg, 2, True), CPU, 10**8)
    assert "FSDP over 2 processes" in sharded and "its 1/2 shard of the weights" in sharded
    assert "gathered whole" in sharded


def test_processes_on_one_machine_share_its_memory(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 12 * 10**9)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_bytes(CPU) == 12 * 10**9 and memory.available_bytes(CPU, 3) == 4 * 10**9
    cfg = resolve_config(TrainConfig(**WIDE))
    monkeypatch.setattr(memory, "need", lambda *args: memory.Need(1, 3, True, 5 * 10**9, 0, 0))
    with pytest.raises(ConfigError, match="4.0 GB free \\(its share of 3 processes on this machine\\)"):
        memory.check_fits(cfg, CPU, 3, sharded=True, local_processes=3)
