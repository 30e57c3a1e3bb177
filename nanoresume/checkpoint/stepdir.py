"""The folder of a run's step checkpoints: what it holds, what is in the way, pruning, setting aside,
and the leftovers of interrupted writes.

A step checkpoint is a file ``step_00000500.pt`` or a folder of shards ``step_00000500``; both
kinds count alike for listing, retention and abandoned timelines. Listing a folder builds nothing
else: a tool that only reads a run uses :class:`CheckpointDir` on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..atomic import fsync_folder
from .files import STEP_FOLDER_PATTERN, STEP_PATTERN, checksum_path, remove_leftovers, step_of
from .folders import remove_unfinished
from .storage import FILE, FOLDER, LOCAL, Storage, as_path, join, name_of

ABANDONED = "abandoned"


@dataclass(frozen=True)
class StepCheckpoint:
    """A step checkpoint: a file, or a folder of shards."""

    step: int
    path: Path  # a str where the folder is a URL (see storage.as_path)

    @property
    def is_folder(self) -> bool:
        return not name_of(self.path).endswith(".pt")


class CheckpointDir:
    """``CheckpointDir("out/checkpoints").list()``: the step checkpoints in one folder, and what may be
    done to them. Every method reads the folder afresh; nothing is cached."""

    def __init__(self, path: Union[str, Path], storage: Storage = LOCAL) -> None:
        self.path = as_path(path)
        self.storage = storage

    def list(self) -> list[StepCheckpoint]:
        """Step checkpoint files and folders present (verified or not), oldest first."""
        found = []
        for entry in self.storage.list(self.path):
            match = STEP_PATTERN.match(entry.name) if entry.kind == FILE else \
                STEP_FOLDER_PATTERN.match(entry.name) if entry.kind == FOLDER else None
            if match:
                found.append(StepCheckpoint(int(match.group(1)), join(self.path, entry.name)))
        return sorted(found, key=lambda s: (s.step, s.is_folder))

    def obstacles(self) -> list[Path]:
        """Entries named like step checkpoints of the other kind (a folder named ``step_*.pt``, a
        file named like a checkpoint folder): a save of that step could never land, so a run
        refuses to start until they are moved."""
        return sorted(join(self.path, e.name) for e in self.storage.list(self.path)
                      if (STEP_PATTERN.match(e.name) and e.kind != FILE)
                      or (STEP_FOLDER_PATTERN.match(e.name) and e.kind != FOLDER))

    def remove_leftovers(self) -> list[Path]:
        """Delete what interrupted writes and deletions left (temp files and folders, orphan
        ``.sha256`` files, folders never committed); returns what was removed."""
        return remove_leftovers(self.path, storage=self.storage) + remove_unfinished(self.path, self.storage)

    def prune(self, keep: Path, keep_last: int) -> list[Path]:
        """Keep ``keep`` (just committed) and the newest ``keep_last`` step checkpoints up to it;
        delete older ones (file, then checksum; or the whole folder)."""
        current = [s for s in self.list() if s.path != keep and s.step <= step_of(keep)]
        deleted = []
        for old in current[: max(0, len(current) - (keep_last - 1))]:
            if old.is_folder:
                self.storage.remove_folder(old.path)
            else:
                self.storage.remove(old.path)
                self.storage.remove(checksum_path(old.path))
            deleted.append(old.path)
        if deleted:
            try:
                self.storage.sync(self.path)
            except OSError:
                pass  # a deletion that does not survive a power cut leaves an extra old file, never less
        return deleted

    def set_aside_after(self, step: int) -> list[Path]:
        """Move step checkpoints newer than ``step`` to a new folder ``abandoned/<n>/``.

        After resuming from an older step (a corrupt newer file, or an explicit path) they belong to
        a timeline this run left: they must neither count for retention nor be picked by a later
        resume, and they are never deleted or overwritten. Each file and its checksum are
        hard-linked into the new folder before either name is removed here (the file first), so a
        kill at any point leaves every pair complete in at least one of the two folders. A
        checkpoint folder moves in one rename. Needs a local folder (links and renames).
        """
        assert isinstance(self.path, Path), "setting checkpoints aside needs a local folder"
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
        fsync_folder(self.path)
        return moved

    def _new_abandoned_folder(self) -> Path:
        root = self.path / ABANDONED
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
