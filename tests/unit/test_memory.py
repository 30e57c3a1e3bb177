"""A size that cannot fit is refused in one line before anything is allocated; real sizes pass."""

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
    monkeypatch.setattr(memory, "available_bytes", lambda device: 80 * 10**9)  # an 80 GB GPU
    memory.check_fits(cfg, torch.device("cuda"))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 10**9)
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
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert memory.check_fits(huge, CPU) is None  # let through, no error
