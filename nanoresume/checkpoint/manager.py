"""The step checkpoints of one run: when to save, how a save is staged and committed, and what a
resume leaves behind (the step it continues from, the checkpoints of an abandoned timeline).

A save has four parts, kept apart so that background saving is natural:

1. **decide** (:meth:`CheckpointManager.is_due`): on the interval, when forced (the last
   step, a stop), or when ``every_seconds`` have passed since the last save;
2. **stage** (:meth:`CheckpointManager.save`, on the training thread): in background mode,
   a real copy of the state in CPU memory (:class:`~nanoresume.checkpoint.snapshot.Snapshotter`);
3. **commit** (on the training thread, or on the writer thread in background mode): the
   atomic write of every file of the save (:func:`~nanoresume.checkpoint.files.save_atomically`),
   or of a sharded checkpoint folder, which every rank writes its part of
   (:func:`~nanoresume.checkpoint.sharded.save_folder`);
4. **after the commit**, off the training thread even in synchronous mode: the ``.sha256``
   files (an extra: every file verifies by itself), then, only on the coordinator, pruning of
   step checkpoints beyond ``keep_last`` (deleting a large file can take a tenth of a second).

A step counts as saved (:attr:`CheckpointManager.committed_step`) only once its commit is
done; :attr:`~CheckpointManager.staged_step` is the newest step handed to the writer. Both are
read-only from outside: :meth:`~CheckpointManager.adopt` and :meth:`~CheckpointManager.mark_staged`
are the ways to change them. What is in the folder is :class:`~.stepdir.CheckpointDir`'s business.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import CheckpointWriteError
from .files import save_atomically, step_folder_path, step_path, write_checksum_file
from .observe import CheckpointObserver
from .snapshot import Snapshotter
from .stepdir import CheckpointDir
from .writer import CommitRunner

class CheckpointManager:
    """Policy, staging, commits and retention for the step checkpoints in ``folder``.

    ``background=True`` commits on a writer thread while training goes on; at most one
    save is in flight, and :meth:`wait` / :meth:`close` return only once it is committed
    (or raise its error, as a synchronous save would have).

    For sharded saves every rank has a manager: ``group`` is the process group their writes
    coordinate over (None: one process), ``token`` names temp folders alike on every rank, and
    only the ``coordinator`` (rank 0) writes files beside the folder and prunes.

    ``on_commit(step, path)`` is called (on the writer thread, in background mode) once each step
    checkpoint is committed; ``observer`` watches every write (see :mod:`.observe`). ``advice`` words
    the fix of a failed write in the caller's terms (:meth:`~nanoresume.errors.CheckpointError.reworded`).
    """

    def __init__(self, folder: Path, interval: int, keep_last: int, background: bool = False,
                 every_seconds: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 group: Any = None, token: str = "0", coordinator: bool = True,
                 on_commit: Optional[Callable[[int, Path], None]] = None,
                 observer: Optional[CheckpointObserver] = None, advice: Optional[Mapping[str, str]] = None) -> None:
        self.dir = CheckpointDir(folder)
        self.folder = self.dir.path
        self.group, self.token, self.coordinator = group, token, coordinator
        self.interval = interval
        self.keep_last = keep_last
        self.every_seconds = every_seconds
        self.clock = clock
        self._on_commit = on_commit
        self._observer = observer
        self._advice = dict(advice or {})
        self._committed_step: Optional[int] = None
        self._committed_path: Optional[Path] = None
        self._staged_step: Optional[int] = None
        self._last_commit_seconds = 0.0
        self._last_stall_seconds = 0.0
        self._runner = CommitRunner(background)
        self._janitor: Optional[threading.Thread] = None  # sidecars and pruning after a synchronous commit
        self._snapshots = Snapshotter()
        self._last_save_time = clock()

    @property
    def background(self) -> bool:
        return self._runner.background

    @property
    def committed_step(self) -> Optional[int]:
        """The newest step checkpoint this run committed (or resumed from), or None."""
        return self._committed_step

    @property
    def committed_path(self) -> Optional[Path]:
        return self._committed_path

    @property
    def staged_step(self) -> Optional[int]:
        """The newest step handed to the writer (committed, or in flight), or None."""
        return self._staged_step

    @property
    def last_commit_seconds(self) -> float:
        """The last commit's own duration (write, fsync, prune)."""
        return self._last_commit_seconds

    @property
    def last_stall_seconds(self) -> float:
        """What the last save cost the training thread."""
        return self._last_stall_seconds

    def adopt(self, path: Path, step: int, warn: Callable[[str], None]) -> None:
        """Continue the run from ``path``, the checkpoint of ``step`` it resumed from.

        A checkpoint in this folder counts as committed (a save of ``step`` writes nothing). Step
        checkpoints newer than ``step`` belong to a timeline the run left: they are set aside
        (:meth:`CheckpointDir.set_aside_after`), each with a warning.
        """
        if Path(path).resolve().parent == self.folder.resolve():
            self._staged_step = self._committed_step = step
            self._committed_path = Path(path)
        for moved in self.dir.set_aside_after(step):
            warn(f"moved {moved.name} to {moved.parent}: it is newer than the checkpoint this run resumed "
                 f"from, so it belongs to a timeline the run left")

    def mark_staged(self, step: int) -> None:
        """Record that another process saves ``step`` (rank 0 writes the file every rank decided on):
        :meth:`is_due` then says no to it, as if this manager had staged it."""
        self._staged_step = step

    # ---- decide, stage, commit -----------------------------------------------------------------

    def is_due(self, step: int, force: bool = False, time_due: Optional[bool] = None) -> bool:
        """Whether ``step`` should be saved: on the interval, forced, or ``every_seconds`` after the
        last save. ``time_due`` overrides this process's clock (a collective decision under torchrun)."""
        if self.staged_step == step:
            return False
        if time_due is None:
            time_due = self.time_due()
        return force or step % self.interval == 0 or time_due

    def time_due(self) -> bool:
        return self.every_seconds is not None and self.clock() - self._last_save_time >= self.every_seconds

    def save(self, step: int, state: Optional[dict[str, Any]],
             also: Sequence[tuple[Path, dict[str, Any]]] = (), sharded: bool = False) -> Optional[Path]:
        """Stage ``state`` as the checkpoint of ``step`` (None: no step checkpoint) and the files in
        ``also`` (``best.pt``), then commit them in that order: now, or in the background.

        ``sharded``: ``state`` is this rank's part of a checkpoint folder, and every rank of the
        group calls this for the same step. Waits for the save in flight first, and raises its error
        if it failed. Returns the step checkpoint's path; in background mode it is committed once
        :meth:`wait` returns.
        """
        started = time.perf_counter()
        self.wait()  # raises the previous save's error; frees its snapshot buffers
        targets: list[tuple[Path, dict[str, Any]]] = list(also)
        path = None
        if state is not None:
            path = step_folder_path(self.folder, step) if sharded else step_path(self.folder, step)
            targets.insert(0, (path, state))
        states = [s for _, s in targets]
        staged = self._snapshots.take(states) if self.background else states
        paths = [p for p, _ in targets]

        def commit() -> None:
            try:
                write()
            except CheckpointWriteError as e:
                raise e.reworded(self._advice) from None

        def write() -> None:
            commit_started = time.perf_counter()
            files = []
            for target, snapshot in zip(paths, staged):
                target.parent.mkdir(parents=True, exist_ok=True)
                if target == path and sharded:
                    from .sharded import save_folder  # here, not at the top: it imports DCP (see folders.py)

                    save_folder(snapshot, target, self.token, self.group, observer=self._observer)
                else:
                    save_atomically(snapshot, target, checksum_file=False, observer=self._observer)
                    files.append(target)
            if path is not None:
                self._committed_step, self._committed_path = step, path
                if self._on_commit is not None:
                    self._on_commit(step, path)
            keep = path if path is not None and self.coordinator else None
            if self.background:
                self._after_commit(files, keep)  # already off the training thread
            else:
                self._janitor = threading.Thread(target=self._after_commit, args=(files, keep),
                                                 name="nanoresume-after-commit")
                self._janitor.start()
            self._last_commit_seconds = time.perf_counter() - commit_started

        if path is not None:
            self._staged_step = step
            self._last_save_time = self.clock()
        self._runner.submit(commit)
        self._last_stall_seconds = time.perf_counter() - started
        return path

    def _after_commit(self, files: list[Path], keep: Optional[Path]) -> None:
        """What follows a commit, off the training thread: the ``.sha256`` of each file (an extra for
        ``sha256sum -c``; each file verifies by itself), then pruning (only after the commit)."""
        for file in files:
            try:
                write_checksum_file(file)
            except (OSError, ValueError):  # ValueError: mmap of a file someone emptied in the meantime
                pass  # the checkpoint is committed and verifies by itself; the extra can wait for the next save
        if keep is not None:
            try:
                self.dir.prune(keep, self.keep_last)
            except OSError:
                pass  # the folder is unreadable just now: an extra old file is kept, and the next save prunes it

    def poll(self) -> None:
        """Raise the error of a background save that failed; call once per step."""
        self._runner.poll()

    def wait(self) -> None:
        """Return once nothing is in flight; raise the error of the last save if it failed."""
        if self._janitor is not None:
            self._janitor.join()
            self._janitor = None
        self._runner.wait()

    def close(self) -> None:
        """Wait for the save in flight and what follows its commit (sidecars, pruning); raise its error."""
        self.wait()

    @property
    def in_flight(self) -> bool:
        return self._runner.in_flight
