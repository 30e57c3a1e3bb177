"""Stop requests: signal handlers that only set a flag; the training loop decides when to act.

The first SIGTERM / SIGINT / SIGUSR1 / SIGHUP asks for a graceful stop (finish the
step, save, exit 128+signal). A forced stop, that is a second signal, or any signal
once the loop is over and only teardown is left, exits at once with 128+signal
after one line naming the last committed checkpoint: that checkpoint stays valid,
and the temp file of an unfinished write is cleaned up at the next start.

One stop often arrives twice within milliseconds: torchrun forwards the SIGTERM or
Ctrl-C that its workers also got directly (a terminal signals the whole process
group, SLURM signals every process of the job). The same signal again within
:data:`DUPLICATE_WINDOW` seconds is that echo, not a user insisting, and is ignored.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

# SIGHUP: an SSH session or terminal closing (torchrun forwards it to its workers too).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
                     if hasattr(signal, name))
DUPLICATE_WINDOW = 0.25  # seconds; forwarding takes milliseconds, a person's second Ctrl-C longer
TIME_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, run again to continue"
TIME_LIMIT_REASON = "time limit"


class StopFlag:
    """Set by a signal (or by code, e.g. a time limit); read by the loop between steps.

    In a loop of your own: ``with stop.installed():`` train while ``not stop.is_set()``, save,
    then exit with ``stop.exit_code``: 128 + the signal (143 SIGTERM, 130 Ctrl-C, 138 SIGUSR1,
    129 SIGHUP), which schedulers read as "stopped, run again".

    The trainer keeps :attr:`last_committed_step` current (the step of the newest
    checkpoint that is safely on disk), so that a forced exit can name it, and sets
    :attr:`exit_on_signal` once nothing is left to save.
    """

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.exit_code = 0  # what the process should exit with once it has stopped
        self.signals_received = 0
        self._first_signal: Optional[tuple[int, float]] = None  # (signal, monotonic time) of the first
        self.last_committed_step: Optional[int] = None
        self.exit_on_signal = False

    def is_set(self) -> bool:
        """Whether a stop was asked for; :attr:`reason` says by what (``"SIGTERM"``, ...)."""
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
        if exit_code == TIME_LIMIT_EXIT_CODE:
            return TIME_LIMIT_REASON, exit_code
        return f"another rank (exit code {exit_code})", exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.exit_on_signal:
            self._exit_now(signum)
        if self._first_signal is not None:
            first, at = self._first_signal
            if first == signum and now - at < DUPLICATE_WINDOW:
                return  # the same stop, delivered twice (forwarded by torchrun, or by SLURM to every process)
            self._exit_now(signum)
        self.signals_received += 1
        self._first_signal = (signum, now)
        self.request(signal.Signals(signum).name, 128 + signum)

    def _exit_now(self, signum: int) -> None:
        """Forced exit: one line by ``os.write``, then ``os._exit``. The handler runs between two
        bytecodes of whatever was interrupted, which may hold any lock (sys.stderr's included), so
        nothing here may print, flush, log or run cleanup."""
        step = self.last_committed_step
        line = f"forced exit; last committed checkpoint: {'none' if step is None else f'step {step}'}\n"
        try:
            os.write(2, line.encode())
        except OSError:
            pass  # stderr is gone; the exit code still tells
        os._exit(128 + signum)

    @staticmethod
    def can_install() -> bool:
        """Signal handlers can only be set from the main thread."""
        return threading.current_thread() is threading.main_thread()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route stop signals to this flag while the block runs; always restore the old handlers.

        Each installation starts graceful: a flag reused for another run forgets the last teardown.
        """
        self.exit_on_signal = False
        if not self.can_install():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
