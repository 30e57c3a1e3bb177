"""The stop flag: signals set it, a second *signal* (not any earlier request) exits at once."""

from __future__ import annotations

import signal

from nanoresume.signals import StopFlag


def test_a_signal_after_a_time_limit_request_is_the_first_signal_and_stops_gracefully():
    flag = StopFlag()
    flag.request("time limit", 75)
    flag._on_signal(signal.SIGTERM, None)  # would os._exit if counted as a second signal
    assert (flag.reason, flag.exit_code, flag.signals_received) == ("time limit", 75, 1)


def test_handlers_are_installed_only_inside_the_block_and_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    with flag.installed():
        assert signal.getsignal(signal.SIGTERM) == flag._on_signal
        signal.raise_signal(signal.SIGTERM)
    assert flag.reason == "SIGTERM" and flag.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before
