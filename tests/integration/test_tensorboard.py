"""TensorBoard curves of a stopped-and-resumed run read like one run in every reader: no gaps, no duplicates.

Two readers purge differently: the legacy ``event_accumulator`` honours every
``SessionLog.START``; ``plugin_event_accumulator`` (TensorBoard's own loader) ignores
the first one it sees. Both must show each step once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from nanoresume.checkpoint import step_path
from tests.helpers import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
plugin_event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")


def read_legacy(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_plugin(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = plugin_event_accumulator.EventAccumulator(str(tb_dir),
                                                    size_guidance={plugin_event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if not tag.startswith("config")}


READERS = pytest.mark.parametrize("read_scalars", [read_legacy, read_plugin], ids=["legacy", "plugin"])


def steps(scalars: dict, tag: str) -> list[int]:
    return [step for step, _ in scalars[tag]]


def values(scalars: dict, tag: str) -> list[float]:
    return [value for _, value in scalars[tag]]


def as_float32(losses: list[tuple[int, float]]) -> list[float]:
    return [float(np.float32(loss)) for _, loss in losses]


def next_second() -> None:
    """Event file names start with whole seconds; a new second keeps them in creation order."""
    time.sleep(1.02 - time.time() % 1)


@READERS
def test_a_single_run_logs_train_loss_at_every_step_and_val_loss_at_each_eval(make_config, read_scalars):
    cfg = make_config(max_steps=10, eval_interval=5)
    _, result = train(cfg)
    scalars = read_scalars(Path(cfg.out_dir) / "tb")
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"}
    assert expected <= set(scalars)
    assert steps(scalars, "train/loss") == list(range(1, 11))
    assert values(scalars, "train/loss") == as_float32(result.step_losses)
    assert steps(scalars, "val/loss") == [0, 5, 10]


@READERS
def test_after_a_stop_and_resume_train_loss_steps_strictly_increase_without_duplicates(make_config, read_scalars):
    cfg = make_config(max_steps=20, eval_interval=5)
    _, first = train(cfg, stop_at=7)
    next_second()
    _, second = train(dataclasses.replace(cfg, resume="auto"))
    tb = Path(cfg.out_dir) / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    scalars = read_scalars(tb)
    assert steps(scalars, "train/loss") == list(range(1, 21))
    assert values(scalars, "train/loss") == as_float32(first.step_losses + second.step_losses)
    assert steps(scalars, "val/loss") == [0, 5, 10, 15, 20]


@READERS
def test_steps_lost_after_the_resumed_checkpoint_are_purged_not_duplicated(make_config, read_scalars):
    """Logged 1..13, but resumed from step 10 (as after kill -9): steps 11..13 appear once, from the resumed
    run. The plugin reader ignores the first START it sees, so this needs one in the fresh run's file too."""
    cfg = make_config(max_steps=20, eval_interval=5, ckpt_interval=10)
    train(cfg, stop_at=13)
    step_path(Path(cfg.out_dir) / "checkpoints", 13).unlink()  # as if killed before saving step 13
    next_second()
    _, resumed = train(dataclasses.replace(cfg, resume="auto"))
    assert resumed.step_losses[0][0] == 11
    scalars = read_scalars(Path(cfg.out_dir) / "tb")
    assert steps(scalars, "train/loss") == list(range(1, 21))
    assert values(scalars, "train/loss")[10:] == as_float32(resumed.step_losses)
    assert steps(scalars, "val/loss") == [0, 5, 10, 15, 20]


def test_a_start_with_nothing_to_train_adds_no_event_file(make_config):
    cfg = make_config(max_steps=5, eval_interval=5)
    train(cfg)
    tb = Path(cfg.out_dir) / "tb"
    before = sorted(tb.iterdir())
    next_second()
    train(dataclasses.replace(cfg, resume="auto"))  # already at step 5 of 5
    assert sorted(tb.iterdir()) == before


def test_the_config_is_logged_as_text_at_the_first_step_of_each_start(make_config):
    cfg = make_config(max_steps=4, eval_interval=2)
    train(cfg)
    acc = plugin_event_accumulator.EventAccumulator(str(Path(cfg.out_dir) / "tb"))
    acc.Reload()
    [event] = acc.Tensors("config/text_summary")
    text = tensor_util.make_ndarray(event.tensor_proto)[0].decode()
    assert event.step == 0
    assert "| `max_steps` | `4` |" in text and "| `n_embd` | `32` |" in text
