"""Runs checkpoint commits: at once on the calling thread, or on one background thread.

The contract the trainer relies on, in either mode:

- :meth:`CommitRunner.submit` first waits for the commit in flight (at most one is),
  then runs or starts the new one;
- an error in a background commit is raised on the training thread by the next
  :meth:`~CommitRunner.poll`, :meth:`~CommitRunner.submit` or :meth:`~CommitRunner.wait`,
  exactly as the same error would have been raised by a synchronous commit;
- :meth:`~CommitRunner.wait` returns once nothing is in flight, and :meth:`~CommitRunner.close`
  waits too, so every way out of training (the end, a signal, a time limit, an
  exception) leaves the last submitted commit either done or reported.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional


class CommitRunner:
    """Runs one commit job at a time; ``background=True`` runs it on a worker thread."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its error), then run ``job`` now or in the background."""
        self.wait()
        if not self.background:
            job()
            return
        self._thread = threading.Thread(target=self._run, args=(job,), name="nanoresume-checkpoint-writer")
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # handed to the training thread; nothing is lost by catching here
            self._error = e

    def poll(self) -> None:
        """Raise the error of a finished background job, if any; never blocks."""
        if not self.in_flight:
            self._reap()

    def wait(self) -> None:
        """Block until no job is in flight; raise the error of the last one, if it failed."""
        if self._thread is not None:
            self._thread.join()
        self._reap()

    def _reap(self) -> None:
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the job in flight; its error, if any, is raised (so it is never silently lost)."""
        self.wait()
