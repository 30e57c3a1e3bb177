"""Stop requests: signal handlers that only set a flag; the training loop decides when to act.

The first SIGTERM / SIGINT / SIGUSR1 / SIGHUP asks for a graceful stop (finish the
step, save, exit 128+signal). What more signals do depends on where the flag runs:

- **A command-line process** (``StopFlag(forced_exit=...)``, as ``nanoresume train`` builds it):
  a second signal, or any signal once the loop is over and only teardown is left, ends the
  process at once with 128+signal after one line naming the last committed checkpoint.
- **Library use** (the default: ``nanoresume.train()``, ``Trainer.run()`` or a loop of your own
  in a Jupyter kernel): the process is never ended. A second signal is *insistence*: the run
  still commits what it is saving, then raises :class:`KeyboardInterrupt` naming the last
  committed step. A third abandons a save in flight (its temp file is removed) and raises
  at once, except while teardown runs (:meth:`StopFlag.protected`), which always completes
  (OUT's lock released, handlers restored) before the interrupt is raised.

Either way the last committed checkpoint stays valid, and the temp file of an unfinished
write is cleaned up at the next start.

One stop often arrives twice within milliseconds: torchrun forwards the SIGTERM or
Ctrl-C that its workers also got directly (a terminal signals the whole process
group, SLURM signals every process of the job). The same signal again within
:data:`DUPLICATE_WINDOW` seconds is that echo, not a user insisting, and is ignored.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

# SIGHUP: an SSH session or terminal closing (torchrun forwards it to its workers too).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
                     if hasattr(signal, name))
DUPLICATE_WINDOW = 0.25  # seconds; forwarding takes milliseconds, a person's second Ctrl-C longer
TIME_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, run again to continue"
TIME_LIMIT_REASON = "time limit"
ABANDON_AFTER = 2  # insisting signals (after the graceful one) that abandon a save in flight and raise at once

# What a command-line process does on a forced stop: (signal, last committed step) -> never returns.
ForcedExit = Callable[[int, Optional[int]], None]


def last_committed(step: Optional[int]) -> str:
    """``"last committed checkpoint: step 40"`` (``none`` before the first): what a forced stop names."""
    return f"last committed checkpoint: {'none' if step is None else f'step {step}'}"


class StopFlag:
    """Set by a signal (or by code, e.g. a time limit); read by the loop between steps.

    In a loop of your own: ``with stop.installed():`` train while ``not stop.is_set()``, save,
    then exit with ``stop.exit_code``: 128 + the signal (143 SIGTERM, 130 Ctrl-C, 138 SIGUSR1,
    129 SIGHUP), which schedulers read as "stopped, run again". A third Ctrl-C raises
    :class:`KeyboardInterrupt` in your loop (see the module's docstring).

    ``forced_exit``: what a forced stop does in a command-line process (called in the handler
    with the signal and :attr:`last_committed_step`; it must end the process). None, the
    default, is library use: the process is never ended.

    The trainer keeps :attr:`last_committed_step` current (the step of the newest
    checkpoint that is safely on disk), so that a forced stop can name it, and calls
    :meth:`tear_down` once nothing is left to save.
    """

    def __init__(self, forced_exit: Optional[ForcedExit] = None) -> None:
        self.reason: Optional[str] = None
        self.exit_code = 0  # what the process should exit with once it has stopped
        self.signals_received = 0
        self._first_signal: Optional[tuple[int, float]] = None  # (signal, monotonic time) of the first
        self.last_committed_step: Optional[int] = None
        self.forced_exit = forced_exit
        self.insisted = 0  # signals after the graceful one (or during teardown): library use only
        self.tearing_down = False  # the loop is over: nothing is left to save
        self._protected = 0  # depth of protected() blocks: no KeyboardInterrupt from the handler there

    def is_set(self) -> bool:
        """Whether a stop was asked for; :attr:`reason` says by what (``"SIGTERM"``, ...)."""
        return self.reason is not None

    def request(self, reason: str, exit_code: int) -> None:
        """Ask for a graceful stop; the first request wins."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    @property
    def forced(self) -> bool:
        """Library use: the user insisted (a second signal, or one during teardown): the run ends by
        raising :class:`KeyboardInterrupt` once what it is saving is committed."""
        return self.insisted >= 1

    @property
    def abandoning(self) -> bool:
        """Library use: the user insisted twice: a save in flight is abandoned (read by the writer)."""
        return self.insisted >= ABANDON_AFTER

    def interrupted(self, detail: str = "") -> KeyboardInterrupt:
        """The :class:`KeyboardInterrupt` a forced stop raises, naming the last committed checkpoint."""
        return KeyboardInterrupt(f"interrupted; {last_committed(self.last_committed_step)}{detail}")

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
        """Runs between two bytecodes of whatever the main thread was doing, which may hold any lock
        (sys.stdout's included): it only sets attributes, and raises only where a raise is safe."""
        now = time.monotonic()
        if self.tearing_down:
            self._force(signum)
            return
        if self._first_signal is not None:
            first, at = self._first_signal
            if first == signum and now - at < DUPLICATE_WINDOW:
                return  # the same stop, delivered twice (forwarded by torchrun, or by SLURM to every process)
            self._force(signum)
            return
        self.signals_received += 1
        self._first_signal = (signum, now)
        self.request(signal.Signals(signum).name, 128 + signum)

    def _force(self, signum: int) -> None:
        if self.forced_exit is not None:
            self.forced_exit(signum, self.last_committed_step)
            return
        self.insisted += 1
        if self.abandoning and not (self._protected or self.tearing_down):
            raise self.interrupted()  # teardown completes first; the run raises once it has

    def tear_down(self) -> None:
        """The loop is over and nothing is left to save: a signal from now on is a forced stop
        (the command line exits at once; library use raises once teardown has run, never during it)."""
        self.tearing_down = True

    @contextmanager
    def protected(self) -> Iterator[None]:
        """A block that must run to its end (releasing a lock, restoring handlers): signals during it
        are counted, and never raise inside it."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1

    def raise_if_forced(self, detail: str = "") -> None:
        """Library use, once a run has torn down: raise :meth:`interrupted` if the user insisted."""
        if self.forced:
            raise self.interrupted(detail)

    @staticmethod
    def can_install() -> bool:
        """Signal handlers can only be set from the main thread."""
        return threading.current_thread() is threading.main_thread()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route stop signals to this flag while the block runs; always restore the old handlers.

        Each installation starts out of teardown: a flag reused for another run forgets the last
        one's. An installation inside another (``nanoresume.train`` around ``Trainer.run``) restores
        the outer one's handlers.
        """
        self.tearing_down = False
        if not self.can_install():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            with self.protected():
                for s in sorted(previous, key=lambda s: s == signal.SIGINT):  # SIGINT last: a Ctrl-C
                    signal.signal(s, previous[s])  # raising in the old handler then leaves none of ours
