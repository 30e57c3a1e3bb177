"""The background uploader: copies each committed checkpoint to the mirror, off the training thread.

Training calls :meth:`Uploader.committed` after each local commit (it returns at once) and never
waits on the network. One upload runs at a time; the next checkpoint waits in a slot of one, and a
newer commit replaces it there (coalescing: when uploads fall behind, the mirror skips to the newest
committed checkpoint, and nothing queues up without bound). A failure is retried with a backoff that
doubles up to a bound; the first failure of a streak gives one warning, the recovery one line, and
training goes on either way.

::

    uploader = Uploader(mirror, out_dir, warn, keep_last=3, protect={resumed_step}).start()
    manager.on_commit = uploader.committed          # (step, path) after each local commit
    steps, seconds = uploader.lag()                 # for the log line, metrics.jsonl, TensorBoard
    ...
    held = uploader.wait(mirror_wait_seconds)       # at the end: final checkpoint, exit_code, metrics
    print(uploader.summary())
    uploader.close()
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .remote import LocalGone, Mirror, UploadMismatch
from .store import describe_failure

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after the n-th failure in a row: ``first``, doubling, never more than ``most``."""

    first: float = 0.5
    most: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.most, self.first * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class _Job:
    step: int
    path: Path


class Uploader:
    """Mirrors the run in ``out_dir`` to ``mirror`` on a daemon thread (see the module docstring).

    ``keep_last``: prune the mirror to that many checkpoints after each pointer (None: never prune);
    ``protect``: steps never pruned (the one the run resumed from); ``held``: the step of this run the
    mirror holds at start, if any (the one resumed from, when the mirror's pointer names it); it counts
    for :meth:`lag` and :meth:`summary`. The mirror is up to date when its pointer names the newest
    local commit (a pointer of a timeline the run left, at a higher step, is not).
    """

    def __init__(self, mirror: Mirror, out_dir: Path, warn: Warn, keep_last: Optional[int] = None,
                 protect: Iterable[int] = (), held: Optional[int] = None, backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mirror, self.out_dir, self.warn = mirror, Path(out_dir), warn
        self.keep_last, self.protect = keep_last, frozenset(protect)
        self.backoff, self.clock = backoff, clock
        self.held: Optional[int] = held  # the step whose checkpoint and pointer the mirror holds
        self.problem: Optional[str] = None  # why the mirror is behind, while it is
        self.coalesced = 0  # committed checkpoints skipped because a newer one came first
        self._cond = threading.Condition()
        self._slot: Optional[_Job] = None  # the newest committed checkpoint not yet being uploaded
        self._busy = False
        self._extras_due = False
        self._closing = False
        self._failures = 0
        self._newest: Optional[int] = None  # the newest committed step
        self._committed_at: dict[int, float] = {}  # committed steps the mirror does not hold yet -> when
        self._thread = threading.Thread(target=self._run, name="nanoresume-mirror", daemon=True)

    def start(self) -> "Uploader":
        self._thread.start()
        return self

    # ---- the training thread's side --------------------------------------------------------------

    def committed(self, step: int, path: Path) -> None:
        """A checkpoint was committed locally; upload it when the uploader is free. Never blocks."""
        with self._cond:
            if self._slot is not None:
                self.coalesced += 1
            self._slot = _Job(step, Path(path))
            self._newest = step
            self._committed_at[step] = self.clock()
            self._cond.notify_all()

    def lag(self) -> tuple[int, float]:
        """(steps, seconds) the mirror is behind the newest local commit: 0 and 0.0 when it holds it;
        else the steps between the two and the time since the oldest commit it does not hold."""
        with self._cond:
            if self._newest is None or self.held == self._newest:
                return 0, 0.0
            behind = self.held is not None and self.held < self._newest
            waiting = [at for step, at in self._committed_at.items() if not behind or step > self.held]
            seconds = self.clock() - min(waiting) if waiting else 0.0
            return self._newest - (self.held if behind else 0), seconds

    def wait(self, timeout: float) -> Optional[int]:
        """Upload the run's small files once more (``exit_code``, the last metrics) and wait, for at most
        ``timeout`` seconds, until the newest committed checkpoint is mirrored; returns the step the
        mirror holds (None: none)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._extras_due = True
            self._cond.notify_all()
            while self._slot is not None or self._busy or self._extras_due:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    break
                self._cond.wait(left)
            return self.held

    def summary(self) -> str:
        """One line for the end of the run: what the mirror holds, and why the newest is missing."""
        with self._cond:
            url = self.mirror.url
            if self._newest is not None and self.held == self._newest:
                return f"mirrored step {self.held} to {url}"
            holds = f"holds step {self.held}" if self.held is not None else "holds no checkpoint of this run"
            if self._newest is None:
                return f"the mirror {url} {holds}"
            why = self.problem or "its upload had not finished when the wait ended"
            return f"the mirror {url} {holds}; step {self._newest} is not mirrored: {why}"

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (an upload in flight is abandoned; the mirror keeps its previous pointer)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.mirror.close()

    # ---- the uploader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and self._slot is None and not self._extras_due:
                    self._cond.wait()
                if self._closing:
                    return
                job, self._slot = self._slot, None
                extras, self._extras_due = self._extras_due, False
                self._busy = True
            try:
                self._upload(job)
            except LocalGone:
                self._done()  # pruned locally before its upload began: a newer commit is on its way
            except Exception as e:  # nothing may stop training: every failure is retried
                self._failed(job, extras, e)
            else:
                self._done(recovered=True)

    def _upload(self, job: Optional[_Job]) -> None:
        self.mirror.upload_extras(self.out_dir)  # first, so that the metrics mirrored reach the checkpoint's step
        if job is None:
            return
        pointer = self.mirror.upload_checkpoint(job.path, job.step)
        with self._cond:
            self.held = pointer.step
            for step in [s for s in self._committed_at if s <= pointer.step]:
                del self._committed_at[step]
        if self.keep_last is not None:
            try:
                self.mirror.prune(self.keep_last, self.protect | {pointer.step})
            except Exception as e:  # an extra old checkpoint stays; the next pointer prunes again
                reason = _reason(self.mirror.url, e)
                self.warn(f"mirror {self.mirror.url}: could not delete old checkpoints ({reason})")

    def _done(self, recovered: bool = False) -> None:
        with self._cond:
            self._busy = False
            if recovered:
                if self.problem is not None:
                    held = f"it holds step {self.held}" if self.held is not None else "it holds no checkpoint yet"
                    self.warn(f"mirror {self.mirror.url} works again; {held}")
                self.problem, self._failures = None, 0
            self._cond.notify_all()

    def _failed(self, job: Optional[_Job], extras: bool, error: Exception) -> None:
        with self._cond:
            self._busy = False
            if self._slot is None and job is not None:
                self._slot = job  # retried, unless a newer commit took its place meanwhile
            self._extras_due = self._extras_due or extras
            self._failures += 1
            reason = _reason(self.mirror.url, error)
            if self.problem is None:
                what = f"step {job.step}" if job is not None else "the run's files"
                self.warn(f"mirror {self.mirror.url}: could not upload {what} ({reason}); training goes on and "
                          f"the upload is retried")
            self.problem = reason
            resume_at = time.monotonic() + self.backoff.delay(self._failures)
            self._cond.notify_all()
            while not self._closing and time.monotonic() < resume_at:
                self._cond.wait(resume_at - time.monotonic())


def _reason(url: str, error: Exception) -> str:
    """Why an upload failed, in a few words (the URL is named by the caller)."""
    if isinstance(error, UploadMismatch):
        return f"the upload did not check out: {error}"
    return describe_failure(url, error).removeprefix(f"--mirror {url}: ")
