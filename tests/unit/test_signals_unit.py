"""The stop flag: signals set it. On the command line a second signal, or one during teardown, exits at
once with one line; in library use (a notebook) the process never ends: a second signal raises
KeyboardInterrupt once the save is committed, a third at once, and handlers are always restored."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nanoresume import signals
from nanoresume.checkpoint import load_checkpoint, save_atomically
from nanoresume.checkpoint.observe import CancelWhen, WriteCancelled
from nanoresume.signals import DUPLICATE_WINDOW, STOP_SIGNALS, TIME_LIMIT_EXIT_CODE, StopFlag
from nanoresume.tools.clitools import command_line_stop_flag


class ForcedExit(Exception):
    """Raised instead of os._exit, so a forced exit fails the test instead of ending pytest."""


@pytest.fixture
def no_exit(monkeypatch):
    def fake_exit(code: int) -> None:
        raise ForcedExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)


@pytest.fixture
def no_echo_window(monkeypatch):
    """Every signal counts, however soon after the one before (no sleeping past DUPLICATE_WINDOW)."""
    monkeypatch.setattr(signals, "DUPLICATE_WINDOW", 0.0)


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in STOP_SIGNALS}


def test_a_signal_after_a_time_limit_request_is_the_first_signal_and_stops_gracefully(no_exit):
    flag = command_line_stop_flag()
    flag.request("time limit", 75)
    flag._on_signal(signal.SIGTERM, None)  # raises ForcedExit if counted as a second signal
    assert (flag.reason, flag.exit_code, flag.signals_received) == ("time limit", 75, 1)


def test_handlers_are_installed_only_inside_the_block_and_restored_after():
    before = handlers()
    flag = StopFlag()
    with flag.installed():
        assert signal.getsignal(signal.SIGTERM) == flag._on_signal
        signal.raise_signal(signal.SIGTERM)
    assert flag.reason == "SIGTERM" and flag.exit_code == 143
    assert handlers() == before


def test_sighup_from_a_closing_terminal_asks_for_a_graceful_stop_with_exit_129():
    assert signal.SIGHUP in STOP_SIGNALS
    before = signal.getsignal(signal.SIGHUP)
    flag = StopFlag()
    with flag.installed():
        signal.raise_signal(signal.SIGHUP)
    assert (flag.reason, flag.exit_code) == ("SIGHUP", 129)
    assert signal.getsignal(signal.SIGHUP) == before


# ---- the command line: a forced stop ends the process -------------------------------------------

@pytest.mark.parametrize("committed, named", [(None, "none"), (40, "step 40")])
def test_on_the_command_line_a_second_signal_prints_one_line_naming_the_last_commit_and_exits_128_plus_n(
        no_exit, capfd, committed, named):
    flag = command_line_stop_flag()
    flag.last_committed_step = committed
    flag._on_signal(signal.SIGINT, None)
    time.sleep(DUPLICATE_WINDOW)
    with pytest.raises(ForcedExit) as forced:
        flag._on_signal(signal.SIGINT, None)
    assert forced.value.args == (130,)
    assert capfd.readouterr().err == f"forced exit; last committed checkpoint: {named}\n"


def test_the_same_signal_again_within_milliseconds_is_an_echo_not_a_forced_stop(no_exit, capfd):
    """torchrun forwards the SIGTERM its workers also got from SLURM or the terminal: one stop, twice."""
    flag = command_line_stop_flag()
    flag._on_signal(signal.SIGTERM, None)
    flag._on_signal(signal.SIGTERM, None)  # would raise ForcedExit if counted
    assert (flag.reason, flag.exit_code) == ("SIGTERM", 143)
    with pytest.raises(ForcedExit):
        flag._on_signal(signal.SIGINT, None)  # another signal is the user insisting
    assert capfd.readouterr().err.startswith("forced exit")


def test_on_the_command_line_once_nothing_is_left_to_save_the_first_signal_already_exits(no_exit, capfd):
    flag = command_line_stop_flag()
    flag.last_committed_step = 7
    flag.tear_down()
    with pytest.raises(ForcedExit) as forced:
        flag._on_signal(signal.SIGTERM, None)
    assert forced.value.args == (143,)
    assert capfd.readouterr().err == "forced exit; last committed checkpoint: step 7\n"


# ---- library use (a notebook): never ends the process --------------------------------------------

def test_in_library_use_a_second_signal_never_exits_and_the_run_raises_after_naming_the_commit(
        no_exit, no_echo_window):
    flag = StopFlag()
    flag.last_committed_step = 40
    flag._on_signal(signal.SIGINT, None)
    flag._on_signal(signal.SIGINT, None)  # insisting: counted, nothing raised inside the handler
    assert flag.is_set() and flag.forced and not flag.abandoning
    with pytest.raises(KeyboardInterrupt, match="last committed checkpoint: step 40; resume"):
        flag.raise_if_forced("; resume")


def test_in_library_use_a_third_signal_raises_at_once_inside_a_loop_and_handlers_are_restored(no_echo_window):
    before = handlers()
    flag = StopFlag()
    flag.last_committed_step = 3
    sent = 0
    with pytest.raises(KeyboardInterrupt, match="step 3") as raised:
        with flag.installed():
            for _ in range(1000):  # a loop of your own that ignores the flag
                if sent < 3:
                    sent += 1
                    os.kill(os.getpid(), signal.SIGINT)
    assert sent == 3 and "interrupted" in str(raised.value)
    assert flag.abandoning
    assert handlers() == before


def test_in_library_use_signals_inside_a_protected_block_never_raise_there(no_echo_window):
    before = handlers()
    flag = StopFlag()
    with flag.installed():
        with flag.protected():  # releasing a lock, restoring handlers: must run to its end
            for _ in range(4):
                os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0)  # calls: Python runs the pending handlers here, still inside the block
            finished_protected_block = True
        assert flag.insisted == 3
    assert finished_protected_block and handlers() == before


def test_in_library_use_a_signal_during_teardown_counts_as_insisting_and_never_raises_there():
    flag = StopFlag()
    flag.tear_down()
    flag._on_signal(signal.SIGINT, None)
    flag._on_signal(signal.SIGTERM, None)
    assert flag.insisted == 2 and flag.abandoning  # an abandon, but no raise in the middle of teardown
    with pytest.raises(KeyboardInterrupt):
        flag.raise_if_forced()


def test_an_abandoned_write_is_cancelled_and_leaves_no_temp_file_and_the_earlier_file_intact(tmp_path):
    import torch

    path = tmp_path / "step.pt"
    earlier = {"format_version": 1, "kind": "state", "x": torch.zeros(4)}
    save_atomically(earlier, path)
    with pytest.raises(WriteCancelled):
        save_atomically({**earlier, "x": torch.ones(1000)}, path, observer=CancelWhen(lambda: True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.pt", "step.pt.sha256"]
    assert torch.equal(load_checkpoint(path)["x"], torch.zeros(4))


def test_a_stop_another_rank_asked_for_is_described_from_its_exit_code_alone():
    assert StopFlag.describe(143) == ("SIGTERM", 143)
    assert StopFlag.describe(TIME_LIMIT_EXIT_CODE) == ("time limit", 75)
    assert StopFlag.describe(99) == ("another rank (exit code 99)", 99)
