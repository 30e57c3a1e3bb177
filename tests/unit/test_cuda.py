"""CUDA paths: bf16 / fp16 + GradScaler, CUDA RNG state, bit-exact resume on a GPU. Skipped without one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanoresume.checkpoint import load_checkpoint, step_path
from nanoresume.runtime import resolve_dtype
from tests.helpers import final_state, train, train_in_pieces

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N = 20  # steps of every run here


@pytest.fixture
def gpu_configs(make_config, tmp_path):
    def make(dtype: str, **overrides):
        cfg = make_config(max_steps=N, eval_interval=5, device="cuda", dtype=dtype, **overrides)
        return (dataclasses.replace(cfg, out_dir=str(tmp_path / "baseline")),
                dataclasses.replace(cfg, out_dir=str(tmp_path / "interrupted")))
    return make


def test_auto_dtype_on_a_gpu_is_bf16_where_supported_else_fp16():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_gpu_run_stopped_and_resumed_is_bitwise_the_uninterrupted_one(gpu_configs, dtype, assert_same_state):
    base_cfg, cut_cfg = gpu_configs(dtype, grad_accum=2)
    baseline, base_result = train(base_cfg)
    resumed, losses = train_in_pieces(cut_cfg, [6, 13])
    assert losses == base_result.step_losses
    assert_same_state(final_state(baseline), final_state(resumed))


def test_fp16_checkpoints_hold_the_grad_scaler_and_cuda_rng_state(gpu_configs):
    base_cfg, _ = gpu_configs("float16")
    trainer, _ = train(base_cfg)
    state = load_checkpoint(step_path(trainer.run_dir.checkpoints, N))
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    cuda_rng = state["ranks"][0]["rng"]["cuda"]
    assert len(cuda_rng) == torch.cuda.device_count()
    assert torch.equal(cuda_rng[0], torch.cuda.get_rng_state(0))


def test_a_gpu_checkpoint_loads_on_the_cpu_for_inspection(gpu_configs):
    base_cfg, _ = gpu_configs("bfloat16")
    trainer, _ = train(base_cfg)
    state = load_checkpoint(step_path(trainer.run_dir.checkpoints, N), map_location="cpu")
    assert all(t.device.type == "cpu" for t in state["model"].values())
