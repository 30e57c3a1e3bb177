"""Stop requests: signal handlers that only set a flag; the training loop decides when to act.

The first SIGTERM / SIGINT / SIGUSR1 asks for a graceful stop (finish the step,
save, exit 128+signal). A second one while stopping exits at once with
128+signal: the last committed checkpoint stays valid and the temp file of an
unfinished write is cleaned up at the next start.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopFlag:
    """Set by a signal (or by code, e.g. a time limit); read by the loop between steps."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.exit_code = 0  # what the process should exit with once it has stopped
        self.signals_received = 0

    def is_set(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, exit_code: int) -> None:
        """Ask for a graceful stop; the first request wins."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    @staticmethod
    def describe(exit_code: int) -> tuple[str, int]:
        """(reason, exit code) of a stop another rank asked for, from its exit code alone."""
        if exit_code > 128:
            try:
                return signal.Signals(exit_code - 128).name, exit_code
            except ValueError:
                pass
        return ("time limit" if exit_code == 75 else f"another rank (exit code {exit_code})"), exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals_received += 1
        if self.signals_received > 1:
            os._exit(128 + signum)  # a second signal: the user wants out now
        self.request(signal.Signals(signum).name, 128 + signum)

    @staticmethod
    def can_install() -> bool:
        """Signal handlers can only be set from the main thread."""
        return threading.current_thread() is threading.main_thread()

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Route stop signals to this flag while the block runs; always restore the old handlers."""
        if not self.can_install():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
