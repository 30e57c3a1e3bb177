"""Durable small writes: a temp file beside the target, fsync, ``os.replace``, fsync the folder.

The temp file lives in the target's own folder (never ``$TMPDIR``), so the final
rename never crosses filesystems and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def is_temp_path(path: Path) -> bool:
    """Whether ``path`` is named like a :func:`temp_path`: a write that has not been committed (yet)."""
    name, _, pid = path.name.rpartition(".tmp.")
    return name.startswith(".") and pid.isdigit()


def write_file_atomically(path: Path, payload: bytes) -> None:
    """Small files (checksums, config.json, data caches): temp file beside ``path``, fsync, replace.

    The caller fsyncs the folder when the rename itself must survive a power cut.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


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
