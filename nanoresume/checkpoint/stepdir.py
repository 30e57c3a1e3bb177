"""The folder of a run's step checkpoints: what it holds, what is in the way, pruning, setting aside,
and the leftovers of interrupted writes.

A step checkpoint is a file ``step_00000500.pt`` or a folder of shards ``step_00000500``; both
kinds count alike for listing, retention and abandoned timelines. Listing a folder builds nothing
else: a tool that only reads a run uses :class:`CheckpointDir` on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..atomic import AtomicFile, fsync_folder
from .files import STEP_FOLDER_PATTERN, STEP_PATTERN, checksum_path, remove_leftovers, step_of
from .folders import remove_unfinished
from .storage import FILE, FOLDER, LOCAL, Storage, as_path, join, name_of

ABANDONED = "abandoned"
# In the checkpoints folder while checkpoints are being set aside: the step kept and the folder they go
# to, so that a kill halfway never lets a later resume continue the timeline the user left.
SET_ASIDE_INTENT = "set-aside.json"


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
        return remove_leftovers(self.path, owned=(SET_ASIDE_INTENT,), storage=self.storage) + \
            remove_unfinished(self.path, self.storage)

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
        resume, and they are never deleted or overwritten. The intent (``step`` and the folder) is
        recorded first, in :data:`SET_ASIDE_INTENT`, and removed once every checkpoint has moved:
        until then :meth:`pending_set_aside` names ``step``, ``resume="auto"`` picks nothing newer,
        and the next set-aside of ``step`` completes the move into the same folder. Each file and
        its checksum are hard-linked into the new folder before either name is removed here (the
        file first), so a kill at any point leaves every pair complete in at least one of the two
        folders. A checkpoint folder moves in one rename. Needs a local folder (links and renames).
        """
        assert isinstance(self.path, Path), "setting checkpoints aside needs a local folder"
        newer = [s for s in self.list() if s.step > step]
        if not newer:
            self._clear_intent()
            return []
        target = self._abandoned_folder_for(step)
        self._record_intent(step, target)
        moved = []
        for item in newer:
            if item.is_folder:
                _rename(item.path, target / item.path.name)
                fsync_folder(target)
                moved.append(target / item.path.name)
                continue
            pair = [p for p in (item.path, checksum_path(item.path)) if p.exists()]
            for source in pair:
                _link_or_move(source, target / source.name)
            fsync_folder(target)
            for source in pair:
                if source.exists():
                    _remove(source)
            moved.append(target / item.path.name)
        fsync_folder(self.path)
        self._clear_intent()
        return moved

    def pending_set_aside(self) -> Optional[int]:
        """The step kept by a set-aside that a kill interrupted (checkpoints newer than it belong to a
        timeline the run left, though some may still be here), or None."""
        intent = self._read_intent()
        return None if intent is None else intent[0]

    def _read_intent(self) -> Optional[tuple[int, str]]:
        """(step kept, name of its abandoned/ folder) from the intent file; None if there is none or it
        is not one (it is replaced or removed by the next set-aside)."""
        if not isinstance(self.path, Path):
            return None
        try:
            intent = json.loads((self.path / SET_ASIDE_INTENT).read_text(encoding="utf-8"))
            step, folder = intent["step"], intent["folder"]
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if type(step) is not int or step < 0 or not (isinstance(folder, str) and folder.isdigit()):
            return None
        return step, folder

    def _record_intent(self, step: int, target: Path) -> None:
        new = AtomicFile(self.path / SET_ASIDE_INTENT)
        try:
            new.file.write(json.dumps({"step": step, "folder": target.name}).encode())
            new.publish()
        finally:
            new.discard()  # a no-op once published

    def _clear_intent(self) -> None:
        intent = self.path / SET_ASIDE_INTENT
        if intent.exists():
            _remove(intent)
            fsync_folder(self.path)

    def _abandoned_folder_for(self, step: int) -> Path:
        """The folder an interrupted set-aside of ``step`` was filling, or a new one."""
        intent = self._read_intent()
        if intent is not None and intent[0] == step and (self.path / ABANDONED / intent[1]).is_dir():
            return self.path / ABANDONED / intent[1]
        return self._new_abandoned_folder()

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
    where links are not supported, or ``target`` is there already (an interrupted set-aside linked
    it), move it."""
    try:
        os.link(source, target)
    except OSError:
        os.replace(source, target)


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove(path: Path) -> None:
    path.unlink()
