"""Trainer.run in library use (a notebook kernel, a program): signals never end the process. A second
one raises KeyboardInterrupt after the save is committed, a third at once; the handlers are restored
and OUT's lock released on every path, so the next call resumes from what was committed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nanoresume import checkpoint, signals
from nanoresume.metrics import TensorBoardLog
from nanoresume.signals import STOP_SIGNALS
from nanoresume.trainer import Trainer

pytestmark = pytest.mark.slow  # each trains a tiny model for a few steps, in this process


@pytest.fixture(autouse=True)
def no_echo_window(monkeypatch):
    """Every signal counts, however soon after the one before (no sleeping past DUPLICATE_WINDOW)."""
    monkeypatch.setattr(signals, "DUPLICATE_WINDOW", 0.0)


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in STOP_SIGNALS}


def cfg_out(cfg) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def interrupt_at(step: int, times: int):
    """An on_step callback that sends this process SIGINT ``times`` times after ``step``."""
    def on_step(trainer: Trainer, at: int, loss: float) -> None:
        if at == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_a_second_interrupt_commits_the_stop_save_then_raises_naming_it(make_config, capsys):
    before = handlers()
    cfg = make_config(max_steps=50, eval_interval=100, ckpt_interval=100)
    with pytest.raises(KeyboardInterrupt) as raised:
        Trainer(cfg, on_step=interrupt_at(3, 2), continue_in="notebook").run()
    assert str(raised.value) == ("interrupted; last committed checkpoint: step 3. Run this cell again "
                                 "(resume='auto' continues from step 3)")
    assert checkpoint.load_checkpoint(checkpoint.step_path(cfg_out(cfg), 3))["step"] == 3
    assert "stopped by SIGINT after step 3; saved " in capsys.readouterr().out
    assert handlers() == before


def test_a_third_interrupt_raises_at_once_and_the_next_run_resumes_from_the_last_commit(make_config):
    before = handlers()
    cfg = make_config(max_steps=50, eval_interval=100, ckpt_interval=2, async_save=False)  # step 2: committed
    with pytest.raises(KeyboardInterrupt, match="last committed checkpoint: step 2") as raised:
        Trainer(cfg, on_step=interrupt_at(3, 3)).run()
    assert "on_step" in "".join(str(frame) for frame in raised.traceback)  # raised at once, inside step 3
    assert not checkpoint.step_path(cfg_out(cfg), 3).exists()
    assert handlers() == before
    resumed = Trainer(make_config(max_steps=4, eval_interval=100, resume="auto"))  # OUT's lock was released
    assert resumed.counters.step == 2
    assert resumed.run().step == 4


def test_a_signal_during_teardown_raises_once_teardown_is_done(make_config, monkeypatch):
    before = handlers()
    close = TensorBoardLog.close

    def close_then_sigint(self: TensorBoardLog) -> None:
        close(self)
        signal.raise_signal(signal.SIGINT)  # the run is over; only teardown is left

    monkeypatch.setattr(TensorBoardLog, "close", close_then_sigint)
    cfg = make_config(max_steps=4, ckpt_interval=2, eval_interval=100)
    with pytest.raises(KeyboardInterrupt, match="last committed checkpoint: step 4"):
        Trainer(cfg).run()
    assert handlers() == before
    assert (cfg_out(cfg).parent / "exit_code").read_text() == "0\n"  # the run itself finished
