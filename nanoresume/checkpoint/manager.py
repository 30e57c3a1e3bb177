"""The step checkpoints of one run: when to save, how a save is staged and committed, how many to
keep, which one a run resumes from, and where checkpoints of an abandoned timeline go.

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

from ..errors import REMEDY_NONE_USABLE, REMEDY_RESUME_OR_ELSEWHERE, CheckpointError, CheckpointWriteError
from .files import (FORMAT_VERSION, load_checkpoint, save_atomically, step_folder_path, step_of, step_path,
                    write_checksum_file)
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
        self.on_commit = on_commit
        self.observer = observer
        self.advice = dict(advice or {})
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
                raise e.reworded(self.advice) from None

        def write() -> None:
            commit_started = time.perf_counter()
            files = []
            for target, snapshot in zip(paths, staged):
                target.parent.mkdir(parents=True, exist_ok=True)
                if target == path and sharded:
                    from .sharded import save_folder  # here, not at the top: it imports DCP (see folders.py)

                    save_folder(snapshot, target, self.token, self.group, observer=self.observer)
                else:
                    save_atomically(snapshot, target, checksum_file=False, observer=self.observer)
                    files.append(target)
            if path is not None:
                self._committed_step, self._committed_path = step, path
                if self.on_commit is not None:
                    self.on_commit(step, path)
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
        self._runner.close()

    @property
    def in_flight(self) -> bool:
        return self._runner.in_flight


def resolve_resume(
    mode: str,
    folder: CheckpointDir,
    warn: Callable[[str], None],
    load: Callable[[Path], dict[str, Any]] = load_checkpoint,
    accept: Optional[Callable[[Path, dict[str, Any]], dict[str, Any]]] = None,
    advice: Optional[Mapping[str, str]] = None,
) -> Optional[tuple[Path, dict[str, Any]]]:
    """Which checkpoint a run starts from, as ``(path, state)``, or None for a fresh start.

    ``accept(path, state)`` returns the state if a run can resume from it, else raises
    CheckpointError (default: :func:`require_train_state`, a nanoresume training state).
    ``advice`` words the fixes of refusals in the caller's terms (see :mod:`nanoresume.errors`).

    - ``"auto"``: the newest step checkpoint that verifies; each newer one that does not is
      skipped with a warning. None if the folder holds no step checkpoints. If it holds some
      and none can be used, refuse (CheckpointError): a new run there would prune or
      overwrite files it could not read, and they may be all that is left of a run.
    - ``"none"``: None, but refuse if the folder already holds step checkpoints, so a
      finished run is never clobbered by accident.
    - anything else: a path that must load, or CheckpointError.
    """
    try:
        return _resolve(mode, folder, warn, load, accept or require_train_state)
    except CheckpointError as e:
        raise e.reworded(advice or {}) from None


def _resolve(mode: str, folder: CheckpointDir, warn: Callable[[str], None], load: Callable[[Path], dict[str, Any]],
             accept: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> Optional[tuple[Path, dict[str, Any]]]:
    obstacles = folder.obstacles()
    if obstacles:
        kind = "a folder" if obstacles[0].is_dir() else "a file" if obstacles[0].is_file() else "no file or folder"
        raise CheckpointError(f"{obstacles[0]} is {kind}, in the way of the checkpoint of step "
                              f"{step_of(obstacles[0])}; move it out of {folder.path}, then start again")
    if mode == "none":
        existing = folder.list()
        if existing:
            raise CheckpointError(f"{folder.path} already holds {len(existing)} checkpoint(s) (newest "
                                  f"{existing[-1].path.name})", "resume from them (mode 'auto') or use another folder",
                                  REMEDY_RESUME_OR_ELSEWHERE, folder=folder.path)
        return None
    if mode == "auto":
        candidates = folder.list()
        for candidate in reversed(candidates):
            try:
                return candidate.path, accept(candidate.path, load(candidate.path))
            except CheckpointError as e:
                warn(f"skipping {e}")
        if candidates:
            names = ", ".join(c.path.name for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            raise CheckpointError(f"none of the {len(candidates)} checkpoint(s) in {folder.path} ({names}) can be "
                                  f"used, and a new run there would delete them",
                                  "move them away to start over, or use another folder", REMEDY_NONE_USABLE,
                                  folder=folder.path)
        return None
    path = Path(mode).expanduser()
    return path, accept(path, load(path))


def require_train_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` if a run can resume from it, else CheckpointError saying why."""
    if state.get("kind") != "train":
        raise CheckpointError(f"{path}: holds {state.get('kind')!r} weights, not a full training state; "
                              f"resume from a checkpoints/step_*.pt file")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: a training state of format {state.get('format_version')!r}, whose data "
                              f"order this nanoresume (format {FORMAT_VERSION}) cannot continue exactly; finish that "
                              f"run with the version that wrote it (its weights still work with sample, evaluate "
                              f"and ckpt export)")
    return state
