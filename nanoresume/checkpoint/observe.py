"""Watching checkpoint writes: an observer is told how a write progresses and when it commits.

Pass one to the code that writes (``CheckpointManager(..., observer=...)``,
``Checkpointer(..., observer=...)``, :func:`~.files.save_atomically`), or register one for every
write in this process with :func:`observe`, which is how a harness watches a training program it
did not build (``python -m nanoresume.tools.chaos_child script PATH``)::

    class Announce(CheckpointObserver):
        def after_commit(self, target):
            print("committed", target)

    stop_observing = checkpoint.observe(Announce())
    ...
    stop_observing()

An observer runs on the thread that writes (the writer thread in background mode). An exception
it raises fails the write as a failure of the disk would (tests use this to simulate a full disk).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional


class CheckpointObserver:
    """No-op methods to override: the base class observes nothing."""

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        """``nbytes`` of the checkpoint file ``path`` are written so far (called after each piece;
        the count starts again with each file)."""

    def before_commit(self, target: Path) -> None:
        """Every byte of ``target`` (a file, or every rank's files of a folder) is written; nothing is
        published under its name yet."""

    def after_commit(self, target: Path) -> None:
        """``target`` is committed under its name."""


_registered: list[CheckpointObserver] = []
_lock = threading.Lock()


def observe(observer: CheckpointObserver) -> Callable[[], None]:
    """Register ``observer`` for every checkpoint write in this process, whoever built the writer;
    returns the function that unregisters it."""
    with _lock:
        _registered.append(observer)

    def stop() -> None:
        with _lock:
            if observer in _registered:
                _registered.remove(observer)

    return stop


def observers(given: Optional[CheckpointObserver] = None) -> Optional[CheckpointObserver]:
    """``given`` together with every registered observer, or None if there are none (a write then
    pays nothing for being observable)."""
    with _lock:
        everyone = ([given] if given is not None else []) + list(_registered)
    if not everyone:
        return None
    return everyone[0] if len(everyone) == 1 else _Together(everyone)


class _Together(CheckpointObserver):
    def __init__(self, members: list[CheckpointObserver]) -> None:
        self.members = members

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        for member in self.members:
            member.on_write_progress(path, nbytes)

    def before_commit(self, target: Path) -> None:
        for member in self.members:
            member.before_commit(target)

    def after_commit(self, target: Path) -> None:
        for member in self.members:
            member.after_commit(target)


class WriteCancelled(BaseException):
    """A write stopped on purpose, not a failure: its temp file is removed, earlier checkpoints stay intact.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` reports it as a broken disk.
    """


class CancelWhen(CheckpointObserver):
    """Cancels a write in progress at its next piece once ``cancelled()`` is true (a file whose every
    byte is written is still published: finishing it costs less than writing it again).

    ``cancelled`` is polled, never waited on, so whatever sets it (a signal handler) takes no lock.
    """

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self.cancelled = cancelled

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        if self.cancelled():
            raise WriteCancelled(f"the write of {path} was abandoned")
