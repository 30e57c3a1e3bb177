"""When a run saves: on the step interval, by the clock (--ckpt-minutes), and never twice for a step."""

from __future__ import annotations

import time
from pathlib import Path

from nanoresume.checkpoint import load_checkpoint
from nanoresume.trainer import Trainer


def test_ckpt_minutes_saves_off_the_step_interval_when_the_time_has_passed(make_config):
    cfg = make_config(max_steps=12, ckpt_interval=1000, eval_interval=1000, keep_last=100,
                      ckpt_minutes=0.05 / 60)  # 50 ms
    Trainer(cfg, on_step=lambda trainer, step, loss: time.sleep(0.03)).run()
    steps = sorted(int(p.stem.split("_")[1]) for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*.pt"))
    # About every second step (30 ms a step, 50 ms between saves), and the last one; never the interval.
    assert 4 <= len(steps) <= 8 and steps[-1] == 12, steps
    assert all(load_checkpoint(Path(cfg.out_dir) / "checkpoints" / f"step_{s:08d}.pt")["step"] == s for s in steps)


def test_without_ckpt_minutes_only_the_interval_and_the_last_step_are_saved(make_config):
    cfg = make_config(max_steps=12, ckpt_interval=5, eval_interval=1000, keep_last=100)
    Trainer(cfg, on_step=lambda trainer, step, loss: time.sleep(0.03)).run()
    steps = sorted(int(p.stem.split("_")[1]) for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*.pt"))
    assert steps == [5, 10, 12]
