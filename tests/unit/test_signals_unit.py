"""The stop flag: signals set it; a second signal, or one during teardown, exits at once with one line."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nanoresume.signals import DUPLICATE_WINDOW, STOP_SIGNALS, TIME_LIMIT_EXIT_CODE, StopFlag


class ForcedExit(Exception):
    """Raised instead of os._exit, so a forced exit fails the test instead of ending pytest."""


@pytest.fixture
def no_exit(monkeypatch):
    def fake_exit(code: int) -> None:
        raise ForcedExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)


def test_a_signal_after_a_time_limit_request_is_the_first_signal_and_stops_gracefully(no_exit):
    flag = StopFlag()
    flag.request("time limit", 75)
    flag._on_signal(signal.SIGTERM, None)  # raises ForcedExit if counted as a second signal
    assert (flag.reason, flag.exit_code, flag.signals_received) == ("time limit", 75, 1)


def test_handlers_are_installed_only_inside_the_block_and_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    with flag.installed():
        assert signal.getsignal(signal.SIGTERM) == flag._on_signal
        signal.raise_signal(signal.SIGTERM)
    assert flag.reason == "SIGTERM" and flag.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_sighup_from_a_closing_terminal_asks_for_a_graceful_stop_with_exit_129():
    assert signal.SIGHUP in STOP_SIGNALS
    before = signal.getsignal(signal.SIGHUP)
    flag = StopFlag()
    with flag.installed():
        signal.raise_signal(signal.SIGHUP)
    assert (flag.reason, flag.exit_code) == ("SIGHUP", 129)
    assert signal.getsignal(signal.SIGHUP) == before


@pytest.mark.parametrize("committed, named", [(None, "none"), (40, "step 40")])
def test_a_second_signal_prints_one_line_naming_the_last_committed_checkpoint_and_exits_128_plus_n(
        no_exit, capfd, committed, named):
    flag = StopFlag()
    flag.last_committed_step = committed
    flag._on_signal(signal.SIGINT, None)
    time.sleep(DUPLICATE_WINDOW)
    with pytest.raises(ForcedExit) as forced:
        flag._on_signal(signal.SIGINT, None)
    assert forced.value.args == (130,)
    assert capfd.readouterr().err == f"forced exit; last committed checkpoint: {named}\n"


def test_the_same_signal_again_within_milliseconds_is_an_echo_not_a_forced_stop(no_exit, capfd):
    """torchrun forwards the SIGTERM its workers also got from SLURM or the terminal: one stop, twice."""
    flag = StopFlag()
    flag._on_signal(signal.SIGTERM, None)
    flag._on_signal(signal.SIGTERM, None)  # would raise ForcedExit if counted
    assert (flag.reason, flag.exit_code) == ("SIGTERM", 143)
    with pytest.raises(ForcedExit):
        flag._on_signal(signal.SIGINT, None)  # another signal is the user insisting
    assert capfd.readouterr().err.startswith("forced exit")


def test_once_nothing_is_left_to_save_the_first_signal_already_exits(no_exit, capfd):
    flag = StopFlag()
    flag.last_committed_step = 7
    flag.exit_on_signal = True
    with pytest.raises(ForcedExit) as forced:
        flag._on_signal(signal.SIGTERM, None)
    assert forced.value.args == (143,)
    assert capfd.readouterr().err == "forced exit; last committed checkpoint: step 7\n"


def test_a_stop_another_rank_asked_for_is_described_from_its_exit_code_alone():
    assert StopFlag.describe(143) == ("SIGTERM", 143)
    assert StopFlag.describe(TIME_LIMIT_EXIT_CODE) == ("time limit", 75)
    assert StopFlag.describe(99) == ("another rank (exit code 99)", 99)
