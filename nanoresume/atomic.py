"""Durable writes on a local disk: a temp file beside the target, fsync, ``os.replace``, fsync the folder.

The temp file lives in the target's own folder (never ``$TMPDIR``), so the final
rename never crosses filesystems and a crash leaves either the old file or the new one.

Every temp name nanoresume makes follows one scheme, ``.<target>.<purpose>.<tag>``:
``purpose`` is ``tmp`` for a write in progress and ``deleting`` for a folder renamed aside
to be deleted; ``tag`` is the writer's pid (or a token shared by every rank of a collective
write). :func:`temp_target` is the one recognizer of that scheme.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import IO, Optional, Union

WRITING = "tmp"
DELETING = "deleting"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<purpose>tmp|deleting)\.(?P<tag>[\w-]+)$")


def temp_name(name: str, tag: Union[int, str, None] = None, purpose: str = WRITING) -> str:
    """``.<name>.<purpose>.<tag>``; ``tag`` defaults to this process's pid."""
    assert purpose in (WRITING, DELETING), purpose
    return f".{name}.{purpose}.{os.getpid() if tag is None else tag}"


def temp_path(path: Path, tag: Union[int, str, None] = None, purpose: str = WRITING) -> Path:
    """The :func:`temp_name` of ``path``, in the same folder."""
    return path.with_name(temp_name(path.name, tag, purpose))


def temp_target(name: str, purposes: tuple[str, ...] = (WRITING,)) -> Optional[str]:
    """The name a temp name stands for (``.step_00000005.pt.tmp.123`` -> ``step_00000005.pt``), or None
    if ``name`` is not a temp name of one of ``purposes``."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match and match.group("purpose") in purposes else None


def temp_writer_pid(name: str) -> Optional[int]:
    """The pid of the process writing temp file ``name`` (``.<target>.tmp.<pid>``), or None if ``name``
    is not such a name (or its tag is a shared token, not a pid)."""
    match = _TEMP_NAME.match(name)
    if match is None or match.group("purpose") != WRITING or not match.group("tag").isdigit():
        return None
    return int(match.group("tag"))


def is_temp_path(path: Path) -> bool:
    """Whether ``path`` is named like a :func:`temp_path`: a write that has not been committed (yet)."""
    return temp_target(path.name) is not None


class AtomicFile:
    """A new file written under a temp name beside ``path``, published whole by one rename.

    ::

        with AtomicFile(path) as new:
            new.file.write(payload)
            new.publish()          # flush, fsync, rename onto ``path``, fsync the folder

    Leaving the ``with`` block without :meth:`publish` (or by an exception) removes the temp file.
    """

    def __init__(self, path: Path, tag: Union[int, str, None] = None) -> None:
        self.path = Path(path)
        self.temp = temp_path(self.path, tag)
        self.file: IO[bytes] = open(self.temp, "wb")
        self.published = False

    def publish(self, sync_folder: bool = True) -> None:
        """Make the file durable and give it its name; ``sync_folder=False`` leaves the folder's fsync
        (what makes the rename itself survive a power cut) to the caller."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)
        self.published = True
        if sync_folder:
            fsync_folder(self.path.parent)

    def discard(self) -> None:
        """Close and remove the temp file (a no-op once published)."""
        if self.published:
            return
        try:
            self.file.close()
        except OSError:
            pass
        remove_quietly(self.temp)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def write_file_atomically(path: Path, payload: bytes) -> None:
    """Small files (checksums, config.json, data caches): temp file beside ``path``, fsync, replace.

    The caller fsyncs the folder when the rename itself must survive a power cut.
    """
    with AtomicFile(path) as new:
        new.file.write(payload)
        new.publish(sync_folder=False)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems refuse fsync on folders
            raise
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
