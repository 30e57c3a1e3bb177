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
done; :attr:`~CheckpointManager.staged_step` is the newest step handed to the writer. A step
checkpoint is a file ``step_00000500.pt`` or a folder ``step_00000500``; both kinds count alike
for retention, resume and abandoned timelines.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..atomic import fsync_folder, remove_quietly
from ..errors import CheckpointError
from .files import (FORMAT_VERSION, STEP_FOLDER_PATTERN, STEP_PATTERN, checksum_path, load_checkpoint,
                    save_atomically, step_folder_path, step_of, step_path, write_checksum_file)
from .folders import delete_folder
from .snapshot import Snapshotter
from .writer import CommitRunner

ABANDONED = "abandoned"


@dataclass(frozen=True)
class StepFile:
    """A step checkpoint: a file, or a folder of shards."""

    step: int
    path: Path

    @property
    def is_folder(self) -> bool:
        return not self.path.name.endswith(".pt")


class CheckpointManager:
    """Policy, staging, commits and retention for the step checkpoints in ``folder``.

    ``background=True`` commits on a writer thread while training goes on; at most one
    save is in flight, and :meth:`wait` / :meth:`close` return only once it is committed
    (or raise its error, as a synchronous save would have).

    For sharded saves every rank has a manager: ``group`` is the process group their writes
    coordinate over (None: one process), ``token`` names temp folders alike on every rank, and
    only the ``coordinator`` (rank 0) writes files beside the folder and prunes.
    """

    def __init__(self, folder: Path, interval: int, keep_last: int, background: bool = False,
                 every_seconds: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 group: Any = None, token: str = "0", coordinator: bool = True) -> None:
        self.folder = Path(folder)
        self.group, self.token, self.coordinator = group, token, coordinator
        self.interval = interval
        self.keep_last = keep_last
        self.every_seconds = every_seconds
        self.clock = clock
        self.committed_step: Optional[int] = None  # newest step checkpoint this run committed (or resumed from)
        self.committed_path: Optional[Path] = None
        self.staged_step: Optional[int] = None  # newest step handed to the writer (committed, or in flight)
        self.last_commit_seconds = 0.0  # the last commit's own duration (write, fsync, prune)
        self.last_stall_seconds = 0.0  # what the last save cost the training thread
        self.on_commit: Optional[Callable[[int, Path], None]] = None  # called (on the writer thread) per commit
        self._runner = CommitRunner(background)
        self._janitor: Optional[threading.Thread] = None  # sidecars and pruning after a synchronous commit
        self._snapshots = Snapshotter()
        self._last_save_time = clock()

    @property
    def background(self) -> bool:
        return self._runner.background

    # ---- the folder ----------------------------------------------------------------------------

    def list(self) -> list[StepFile]:
        """Step checkpoint files and folders present (verified or not), oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = STEP_PATTERN.match(path.name) if path.is_file() else \
                STEP_FOLDER_PATTERN.match(path.name) if path.is_dir() else None
            if match:
                found.append(StepFile(int(match.group(1)), path))
        return sorted(found, key=lambda s: (s.step, s.is_folder))

    def obstacles(self) -> list[Path]:
        """Entries named like step checkpoints of the other kind (a folder named ``step_*.pt``, a
        file named like a checkpoint folder): a save of that step could never land, so a run
        refuses to start until they are moved."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if (STEP_PATTERN.match(p.name) and not p.is_file())
                      or (STEP_FOLDER_PATTERN.match(p.name) and not p.is_dir()))

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
            commit_started = time.perf_counter()
            files = []
            for target, snapshot in zip(paths, staged):
                target.parent.mkdir(parents=True, exist_ok=True)
                if target == path and sharded:
                    from .sharded import save_folder  # here, not at the top: it imports DCP (see folders.py)

                    save_folder(snapshot, target, self.token, self.group)
                else:
                    save_atomically(snapshot, target, checksum_file=False)
                    files.append(target)
            if path is not None:
                self.committed_step, self.committed_path = step, path
                if self.on_commit is not None:
                    self.on_commit(step, path)
            keep = path if path is not None and self.coordinator else None
            if self.background:
                self._after_commit(files, keep)  # already off the training thread
            else:
                self._janitor = threading.Thread(target=self._after_commit, args=(files, keep),
                                                 name="nanoresume-after-commit")
                self._janitor.start()
            self.last_commit_seconds = time.perf_counter() - commit_started

        if path is not None:
            self.staged_step = step
            self._last_save_time = self.clock()
        self._runner.submit(commit)
        self.last_stall_seconds = time.perf_counter() - started
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
                self.prune(keep=keep)
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

    # ---- retention and abandoned timelines -----------------------------------------------------

    def prune(self, keep: Path) -> list[Path]:
        """Keep ``keep`` (just committed) and the newest ``keep_last`` step checkpoints up to it;
        delete older ones (file, then checksum; or the whole folder)."""
        current = [s for s in self.list() if s.path != keep and s.step <= step_of(keep)]
        deleted = []
        for old in current[: max(0, len(current) - (self.keep_last - 1))]:
            if old.is_folder:
                delete_folder(old.path)
            else:
                remove_quietly(old.path)
                remove_quietly(checksum_path(old.path))
            deleted.append(old.path)
        if deleted:
            try:
                fsync_folder(self.folder)
            except OSError:
                pass  # a deletion that does not survive a power cut leaves an extra old file, never less
        return deleted

    def set_aside_after(self, step: int) -> list[Path]:
        """Move step checkpoints newer than ``step`` to a new folder ``abandoned/<n>/``.

        After resuming from an older step (a corrupt newer file, or an explicit --resume PATH) they
        belong to a timeline this run left: they must neither count for --keep-last nor be picked by
        a later --resume auto, and they are never deleted or overwritten. Each file and its checksum
        are hard-linked into the new folder before either name is removed here (the file first), so a
        kill at any point leaves every pair complete in at least one of the two folders. A checkpoint
        folder moves in one rename.
        """
        newer = [s for s in self.list() if s.step > step]
        if not newer:
            return []
        target = self._new_abandoned_folder()
        moved = []
        for item in newer:
            if item.is_folder:
                os.replace(item.path, target / item.path.name)
                fsync_folder(target)
                moved.append(target / item.path.name)
                continue
            pair = [p for p in (item.path, checksum_path(item.path)) if p.exists()]
            for source in pair:
                _link_or_move(source, target / source.name)
            fsync_folder(target)
            for source in pair:
                if source.exists():
                    source.unlink()
            moved.append(target / item.path.name)
        fsync_folder(self.folder)
        return moved

    def _new_abandoned_folder(self) -> Path:
        root = self.folder / ABANDONED
        root.mkdir(exist_ok=True)
        taken = {int(p.name) for p in root.iterdir() if p.name.isdigit()}
        number = max(taken, default=0) + 1
        while True:
            folder = root / str(number)
            try:
                folder.mkdir()
            except FileExistsError:
                number += 1
                continue
            fsync_folder(root)
            return folder


def _link_or_move(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` (both names exist until the caller removes ``source``);
    where links are not supported, move it."""
    try:
        os.link(source, target)
    except OSError:
        os.replace(source, target)


def resolve_resume(
    mode: str,
    manager: CheckpointManager,
    warn: Callable[[str], None],
    load: Callable[[Path], dict[str, Any]] = load_checkpoint,
    accept: Optional[Callable[[Path, dict[str, Any]], dict[str, Any]]] = None,
) -> Optional[tuple[Path, dict[str, Any]]]:
    """Which checkpoint a run starts from, as ``(path, state)``, or None for a fresh start.

    ``accept(path, state)`` returns the state if a run can resume from it, else raises
    CheckpointError (default: :func:`require_train_state`, a nanoresume training state).

    - ``"auto"``: the newest step checkpoint that verifies; each newer one that does not is
      skipped with a warning. None if the folder holds no step checkpoints. If it holds some
      and none can be used, refuse (CheckpointError): a new run there would prune or
      overwrite files it could not read, and they may be all that is left of a run.
    - ``"none"``: None, but refuse if the folder already holds step checkpoints, so a
      finished run is never clobbered by accident.
    - anything else: a path that must load, or CheckpointError.
    """
    accept = accept or require_train_state
    obstacles = manager.obstacles()
    if obstacles:
        kind = "a folder" if obstacles[0].is_dir() else "a file" if obstacles[0].is_file() else "no file or folder"
        raise CheckpointError(f"{obstacles[0]} is {kind}, in the way of the checkpoint of step "
                              f"{step_of(obstacles[0])}; move it out of {manager.folder}, then start again")
    if mode == "none":
        existing = manager.list()
        if existing:
            raise CheckpointError(
                f"{manager.folder} already holds {len(existing)} checkpoint(s) (newest {existing[-1].path.name}); "
                f"pass --resume auto to continue that run, or choose another --out-dir")
        return None
    if mode == "auto":
        candidates = manager.list()
        for candidate in reversed(candidates):
            try:
                return candidate.path, accept(candidate.path, load(candidate.path))
            except CheckpointError as e:
                warn(f"skipping {e}")
        if candidates:
            names = ", ".join(c.path.name for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {manager.folder} ({names}) can be used, and a new "
                f"run there would delete them; see why with: python -m nanoresume.tools.ckpt verify {manager.folder}. "
                f"Move them away to start over, or choose another --out-dir")
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
