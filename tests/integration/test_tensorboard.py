"""TensorBoard curves of a stopped-and-resumed run read like one run: no gaps, no duplicates."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from nanoresume.checkpoint import step_path
from tests.helpers import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(tb_dir: Path) -> dict[str, list]:
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def next_second() -> None:
    """Event file names start with whole seconds; a new second keeps them in creation order."""
    time.sleep(1.02 - time.time() % 1)


def test_a_single_run_logs_train_loss_at_every_step_and_val_loss_at_each_eval(make_config):
    cfg = make_config(max_steps=10, eval_interval=5)
    _, result = train(cfg)
    scalars = read_scalars(Path(cfg.out_dir) / "tb")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss",
            "val/perplexity"} <= set(scalars)
    assert [e.step for e in scalars["train/loss"]] == list(range(1, 11))
    assert [e.value for e in scalars["train/loss"]] == [float(np.float32(loss)) for _, loss in result.step_losses]
    assert [e.step for e in scalars["val/loss"]] == [0, 5, 10]


def test_after_a_stop_and_resume_train_loss_steps_strictly_increase_without_duplicates(make_config):
    cfg = make_config(max_steps=20, eval_interval=5)
    _, first = train(cfg, stop_at=7)
    next_second()
    _, second = train(dataclasses.replace(cfg, resume="auto"))
    tb = Path(cfg.out_dir) / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    scalars = read_scalars(tb)
    steps = [e.step for e in scalars["train/loss"]]
    assert steps == list(range(1, 21))
    losses = first.step_losses + second.step_losses
    assert [e.value for e in scalars["train/loss"]] == [float(np.float32(loss)) for _, loss in losses]
    assert [e.step for e in scalars["val/loss"]] == [0, 5, 10, 15, 20]


def test_steps_lost_after_the_resumed_checkpoint_are_purged_not_duplicated(make_config):
    """Logged 1..13, but resumed from step 10: steps 11..13 appear once, from the resumed run."""
    cfg = make_config(max_steps=20, eval_interval=5, ckpt_interval=10)
    train(cfg, stop_at=13)
    step_path(Path(cfg.out_dir) / "checkpoints", 13).unlink()  # as if killed before saving step 13
    next_second()
    _, resumed = train(dataclasses.replace(cfg, resume="auto"))
    assert resumed.step_losses[0][0] == 11
    scalars = read_scalars(Path(cfg.out_dir) / "tb")
    steps = [e.step for e in scalars["train/loss"]]
    assert steps == list(range(1, 21))
    assert [e.value for e in scalars["train/loss"]][10:] == [float(np.float32(loss)) for _, loss in resumed.step_losses]
    assert [e.step for e in scalars["val/loss"]] == [0, 5, 10, 15, 20]
