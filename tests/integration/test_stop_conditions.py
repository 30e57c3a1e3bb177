"""In-process stops: a signal during teardown, a step too slow for a grace period, a time limit
that counts from process start."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nanoresume import slowsteps
from nanoresume.tools import cli
from nanoresume.tools.clitools import command_line_stop_flag
from nanoresume.metrics import TensorBoardLog
from nanoresume.signals import TIME_LIMIT_EXIT_CODE
from nanoresume.trainer import Trainer


class ForcedExit(Exception):
    """Raised instead of os._exit, so a forced exit ends the test instead of pytest."""


def test_on_the_command_line_a_signal_during_teardown_exits_at_once_naming_the_last_committed_checkpoint(
        make_config, monkeypatch, capfd):
    def fake_exit(code: int) -> None:
        raise ForcedExit(code)

    close = TensorBoardLog.close

    def close_then_sigterm(self: TensorBoardLog) -> None:
        close(self)
        signal.raise_signal(signal.SIGTERM)  # the run is over; only teardown is left

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(TensorBoardLog, "close", close_then_sigterm)
    trainer = Trainer(make_config(max_steps=6, ckpt_interval=4, eval_interval=100), stop=command_line_stop_flag())
    with pytest.raises(ForcedExit) as forced:
        trainer.run()
    assert forced.value.args == (143,)
    assert capfd.readouterr().err.splitlines()[-1] == "forced exit; last committed checkpoint: step 6"
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored all the same


def test_steps_longer_than_the_grace_period_warn_once_with_advice_for_the_settings(make_config, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(slowsteps, "SLOW_STEP_SECONDS", 0.0)  # every step counts as slow
    monkeypatch.setattr(slowsteps, "SUSTAINED_STEPS", 2)
    Trainer(make_config(max_steps=3, eval_interval=100, grad_accum=2)).run()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "grace period" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: steps 1-2 each took over 0 s"), warnings
    assert "Lower --grad-accum (now 2" in warnings[0]


def test_the_time_limit_counts_from_the_start_it_is_given_not_from_the_trainer(make_config):
    # As if the process had started 100 s ago: a 50 s limit is already spent after one step.
    trainer = Trainer(make_config(max_steps=50, time_limit=50.0), started=time.monotonic() - 100)
    result = trainer.run()
    assert (result.step, result.exit_code, result.stop_reason) == (1, TIME_LIMIT_EXIT_CODE, "time limit")


def test_the_command_line_counts_the_time_limit_from_the_process_start(tiny_cli_args, monkeypatch, capsys):
    # As if the process had started 100 s ago: a 50 s limit is already spent after one step.
    monkeypatch.setattr(cli, "PROCESS_STARTED", time.monotonic() - 100)
    assert cli.main(tiny_cli_args(max_steps=50, time_limit=50.0)) == TIME_LIMIT_EXIT_CODE
    assert "stopped by time limit after step 1;" in capsys.readouterr().out
