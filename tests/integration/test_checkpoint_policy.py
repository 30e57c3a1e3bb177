"""When a run saves: on the step interval, by the clock (--ckpt-minutes), and never twice for a step.

The clock of the saves is a fake that moves only when a step ends, so what is saved does not depend
on how fast this machine trains."""

from __future__ import annotations

import time
from pathlib import Path

from nanoresume.checkpoint import load_checkpoint
from nanoresume.trainer import Trainer

STEP_SECONDS = 35.0  # what the fake clock moves per step


class StepClock:
    """A monotonic clock that stands still until :meth:`tick`."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def tick(self, *_: object) -> None:
        self.now += STEP_SECONDS


def run_on_the_step_clock(cfg) -> list[int]:
    """Train ``cfg`` with the save policy on a :class:`StepClock`; the steps of the checkpoints left."""
    clock = StepClock()
    trainer = Trainer(cfg, on_step=clock.tick)
    trainer.manager.clock = clock  # the save policy's clock (the manager's last save time: real, milliseconds ago)
    trainer.run()
    return sorted(int(p.stem.split("_")[1]) for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*.pt"))


def test_ckpt_minutes_saves_off_the_step_interval_when_the_time_has_passed(make_config):
    cfg = make_config(max_steps=12, ckpt_interval=1000, eval_interval=1000, keep_last=100, ckpt_minutes=1.0)
    steps = run_on_the_step_clock(cfg)
    # 35 s a step: a save is voted once a minute has passed since the end of the step last saved, so
    # every third step (and the last step, always); never the interval.
    assert steps == [3, 6, 9, 12], steps
    assert all(load_checkpoint(Path(cfg.out_dir) / "checkpoints" / f"step_{s:08d}.pt")["step"] == s for s in steps)


def test_without_ckpt_minutes_only_the_interval_and_the_last_step_are_saved(make_config):
    cfg = make_config(max_steps=12, ckpt_interval=5, eval_interval=1000, keep_last=100)
    assert run_on_the_step_clock(cfg) == [5, 10, 12]
