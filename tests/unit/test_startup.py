"""The start-up plan: resume, train an unsaved run again, or start fresh, decided from plain values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanoresume.config import TrainConfig, resolve_config
from nanoresume.errors import CheckpointError, ConfigError
from nanoresume.startup import StartMode, choose_parallelism, plan_start


def _asked(**changes: object) -> TrainConfig:
    return resolve_config(TrainConfig(**changes), check=False)


def _checkpoint(world_size: int = 1, **changes: object) -> dict:
    """The parts of a training state that the plan reads."""
    return {"config": dataclasses.replace(_asked(), **changes).to_dict(), "world_size": world_size}


def test_nothing_found_starts_fresh_with_the_config_asked_for():
    asked = _asked(max_steps=12)
    plan = plan_start(None, None, asked, explicit={"max_steps"}, world_size=1)
    assert (plan.mode, plan.cfg, plan.changes) == (StartMode.FRESH, asked, ())


def test_a_checkpoint_is_resumed_with_its_config_and_the_flags_given_now():
    plan = plan_start(_checkpoint(max_steps=40, lr=1e-3), None, _asked(max_steps=80, resume="auto"),
                      explicit={"max_steps", "resume"}, world_size=1)
    assert plan.mode is StartMode.RESUME
    assert (plan.cfg.max_steps, plan.cfg.lr, plan.cfg.resume) == (80, 1e-3, "auto")
    assert plan.changes == ("--max-steps: 40 -> 80",)


def test_a_checkpoint_wins_over_the_config_json_of_an_earlier_start():
    plan = plan_start(_checkpoint(max_steps=40), _asked(max_steps=99).to_dict(), _asked(), set(), 1)
    assert plan.mode is StartMode.RESUME and plan.cfg.max_steps == 40


def test_a_run_killed_before_its_first_checkpoint_is_trained_again_from_its_config_json():
    unsaved = {**_asked(max_steps=30).to_dict(), "world_size": 1}
    plan = plan_start(None, unsaved, _asked(resume="auto", eval_interval=5), {"resume", "eval_interval"}, 1)
    assert plan.mode is StartMode.RERUN
    assert (plan.cfg.max_steps, plan.cfg.eval_interval) == (30, 5)
    assert plan.changes == ("--eval-interval: 500 -> 5",)


def test_training_an_unsaved_run_again_on_other_data_is_refused_naming_its_config_json():
    unsaved = _asked(data=None).to_dict()
    with pytest.raises(CheckpointError, match="--data is None in OUT/config.json but 'x.txt' now"):
        plan_start(None, unsaved, _asked(data="x.txt"), {"data"}, 1, unsaved_source="OUT/config.json")


def test_a_resume_on_more_processes_keeps_the_global_batch():
    plan = plan_start(_checkpoint(world_size=1, batch_size=4, grad_accum=4), None, _asked(), set(), world_size=4)
    assert plan.cfg.grad_accum == 1
    assert plan.changes[-1] == "processes: 1 -> 4 (global batch 16 sequences per step)"


def test_a_merged_config_that_is_invalid_is_refused():
    with pytest.raises(ConfigError, match="--eval-interval 0 must be at least 1"):
        plan_start(_checkpoint(), None, _asked(eval_interval=0), {"eval_interval"}, 1)


def test_fsdp_shards_only_under_torchrun_and_stores_folders_by_default():
    launched = choose_parallelism(_asked(parallel="fsdp"), launched=True, dtype=torch.float32)
    assert (launched.sharded_model, launched.folder_checkpoints, launched.warning) == (True, True, None)
    alone = choose_parallelism(_asked(parallel="fsdp"), launched=False, dtype=torch.float32)
    assert (alone.sharded_model, alone.folder_checkpoints) == (False, False)
    assert alone.warning.startswith("--parallel fsdp: a single process has nothing to share")


def test_checkpoint_format_sharded_stores_folders_without_fsdp():
    chosen = choose_parallelism(_asked(ckpt_format="sharded"), launched=False, dtype=torch.float32)
    assert (chosen.sharded_model, chosen.folder_checkpoints) == (False, True)


def test_float16_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match="--dtype float16 with --parallel fsdp"):
        choose_parallelism(_asked(parallel="fsdp"), launched=True, dtype=torch.float16)
