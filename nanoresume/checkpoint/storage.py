"""The few operations the checkpoint package needs from a filesystem, and the local disk's implementation.

Paths are ``str`` (``os.PathLike`` is accepted too), so that a URL such as ``s3://bucket/run``
passes through unchanged: the package never turns a URL into a ``Path`` (which would fold its
``//``), and takes names apart with :func:`name_of`, :func:`parent_of` and :func:`join`.

The commit protocol asks only for what an object store without rename can give:

- :meth:`Storage.create` returns a :class:`Writing`: bytes go into ``writing.file`` and appear
  under the final name only at :meth:`Writing.publish`, whole or not at all. The local disk
  writes a temp file beside the target and renames it; an object store would write straight to
  the final key and complete the upload at ``publish`` (a PUT needs no rename).
- :meth:`Storage.create_folder` returns a :class:`FolderWriting`: files go under
  ``writing.path`` and the folder appears under its name at ``publish``. Locally that is a temp
  folder renamed into place; on an object store ``writing.path`` is the final prefix, and the
  folder counts once its manifest (written last) exists.
- :meth:`Storage.open_read`, :meth:`Storage.kind`, :meth:`Storage.list`, :meth:`Storage.remove`,
  :meth:`Storage.remove_folder` and :meth:`Storage.sync` (make what was published durable; a
  no-op where a publish already is).

:data:`LOCAL` is the local disk: fsync and rename for commits (:mod:`nanoresume.atomic`), and for
reads a memory map of one open file, which ``torch.load`` can map again through ``/proc/self/fd``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import posixpath
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Protocol, TypeVar, Union

from ..atomic import DELETING, AtomicFile, fsync_folder, remove_quietly, temp_path

PathLike = Union[str, "os.PathLike[str]"]
FILE, FOLDER, OTHER = "file", "folder", "other"
_OPEN_FD_PATH = "/proc/self/fd"  # reopening an open file through here gets the same inode, not the name


P = TypeVar("P", str, Path)


def as_path(path: PathLike) -> Union[str, Path]:
    """A URL (``scheme://...``) as the string it is, anything else as a :class:`~pathlib.Path`."""
    text = os.fspath(path)
    return text if "://" in text else Path(text)


def name_of(path: PathLike) -> str:
    """The last part of a path or URL: ``s3://b/run/step_00000001.pt`` -> ``step_00000001.pt``."""
    return posixpath.basename(os.fspath(path).rstrip("/"))


def parent_of(path: P) -> P:
    """The folder holding a path or URL, of the same type."""
    if isinstance(path, Path):
        return path.parent
    return path.rstrip("/").rpartition("/")[0]


def join(folder: P, name: str) -> P:
    """``folder/name`` for a path or a URL, of the same type."""
    return folder / name if isinstance(folder, Path) else f"{folder.rstrip('/')}/{name}"


class NotAFileError(OSError):
    """The path names something other than a regular file (a device, a socket, ...)."""


@dataclass(frozen=True)
class Entry:
    """One name in a folder listing. ``kind`` follows symlinks; ``link`` says whether the name is one."""

    name: str
    kind: str  # FILE, FOLDER or OTHER
    link: bool = False


class Writing(Protocol):
    """A new object being written: write to ``file``, then :meth:`publish` or :meth:`discard`."""

    file: IO[bytes]

    def publish(self) -> None:
        """Make the object appear, whole, under its final name (durably, where the store allows)."""

    def discard(self) -> None:
        """Drop what was written; the final name is untouched. A no-op after :meth:`publish`."""


class FolderWriting(Protocol):
    """A new folder being written: files go under ``path``, then :meth:`publish` or :meth:`discard`."""

    path: str

    def publish(self) -> None:
        """Make the folder appear under its final name; raises FileExistsError if one is there."""

    def discard(self) -> None:
        """Remove what was written under ``path``."""


@dataclass(frozen=True)
class Reading:
    """An object open for reading: ``data`` holds its bytes (a memory map where possible), and
    ``local_name``, where not None, is a name that ``torch.load`` can open for these very bytes
    (not the object's name, which may have been replaced since it was opened)."""

    data: Any  # bytes-like
    local_name: Optional[str] = None


class Storage(Protocol):
    def create(self, path: PathLike) -> Writing: ...

    def create_folder(self, path: PathLike, tag: str) -> FolderWriting:
        """``tag`` names the write alike in every process that writes part of the folder."""

    def open_read(self, path: PathLike) -> contextlib.AbstractContextManager[Reading]:
        """Raises FileNotFoundError, IsADirectoryError, :class:`NotAFileError` or another OSError."""

    def kind(self, path: PathLike) -> Optional[str]:
        """FILE, FOLDER, OTHER, or None if nothing has that name."""

    def list(self, folder: PathLike) -> list[Entry]:
        """The names in ``folder`` (unsorted), or [] if it does not exist."""

    def remove(self, path: PathLike) -> None:
        """Remove a file; nothing happens if it is already gone."""

    def remove_folder(self, path: PathLike) -> None:
        """Remove a folder and everything in it, never leaving a part of it under its name."""

    def sync(self, folder: PathLike) -> None:
        """Make the publishes and removals in ``folder`` durable."""


class LocalStorage:
    """:class:`Storage` on a local (or mounted) filesystem."""

    def create(self, path: PathLike) -> Writing:
        return AtomicFile(Path(path))

    def create_folder(self, path: PathLike, tag: str) -> FolderWriting:
        return _LocalFolderWriting(Path(path), tag)

    @contextlib.contextmanager
    def open_read(self, path: PathLike) -> Iterator[Reading]:
        fd = os.open(path, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{path} is a folder")
            if not stat.S_ISREG(info.st_mode):
                raise NotAFileError(f"{path} is not a regular file")
            if info.st_size == 0:
                yield Reading(b"")  # mmap refuses empty files
                return
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                with os.fdopen(os.dup(fd), "rb") as f:
                    yield Reading(f.read())
                return
            with mapping:
                local_name = f"{_OPEN_FD_PATH}/{fd}" if sys.platform.startswith("linux") and \
                    os.path.isdir(_OPEN_FD_PATH) else None
                yield Reading(mapping, local_name)
        finally:
            os.close(fd)

    def kind(self, path: PathLike) -> Optional[str]:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError:
            return OTHER
        return FILE if stat.S_ISREG(mode) else FOLDER if stat.S_ISDIR(mode) else OTHER

    def list(self, folder: PathLike) -> list[Entry]:
        try:
            with os.scandir(folder) as entries:
                return [Entry(e.name, _entry_kind(e), e.is_symlink()) for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, path: PathLike) -> None:
        remove_quietly(Path(path))

    def remove_folder(self, path: PathLike) -> None:
        """Renamed aside (and the rename made durable) before its files go."""
        folder = Path(path)
        aside = temp_path(folder, purpose=DELETING)
        os.replace(folder, aside)
        fsync_folder(folder.parent)
        shutil.rmtree(aside, ignore_errors=True)

    def sync(self, folder: PathLike) -> None:
        fsync_folder(Path(folder))


def _entry_kind(entry: os.DirEntry) -> str:
    try:
        return FILE if entry.is_file() else FOLDER if entry.is_dir() else OTHER
    except OSError:
        return OTHER


class _LocalFolderWriting:
    """A temp folder beside the target, renamed into place; its files are fsynced by their writer."""

    def __init__(self, target: Path, tag: str) -> None:
        self.target = target
        self.temp = temp_path(target, tag)
        self.path = str(self.temp)

    def publish(self) -> None:
        fsync_folder(self.temp)
        if self.target.exists() and not _is_empty_folder(self.target):
            raise FileExistsError(f"{self.target} already exists")
        os.replace(self.temp, self.target)
        fsync_folder(self.target.parent)

    def discard(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


LOCAL = LocalStorage()
