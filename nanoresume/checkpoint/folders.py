"""Checkpoint folders as files on disk: their manifest, their digests, their removal, and the
leftovers of interrupted writes. What is inside the files is :mod:`.sharded`'s business.

Kept apart from :mod:`.sharded` because that one imports ``torch.distributed.checkpoint``
(more than half a second): listing, pruning or cleaning a run's folder must not pay for it.

A committed folder holds ``MANIFEST.sha256``, written last: one ``<sha256>  <file name>`` line per
other file, so ``cd step_00000500 && sha256sum -c MANIFEST.sha256`` checks it by hand too. A
folder without one was never committed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import fsync_folder, write_file_atomically
from ..errors import CheckpointError
from .files import STEP_FOLDER_PATTERN

MANIFEST = "MANIFEST.sha256"
METADATA = ".metadata"  # DCP's index of the folder
_HASH_CHUNK = 8 << 20
# Folders left beside a step folder only by a kill: a write, or a deletion, in progress.
_UNFINISHED = re.compile(r"^\.step_\d{8,}\.(tmp|deleting)\.[\w-]+$")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def write_manifest(folder: Path, digests: dict[str, str]) -> None:
    """``MANIFEST.sha256`` in ``folder`` (temp file, fsync, rename), then fsync the folder."""
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    write_file_atomically(folder / MANIFEST, lines.encode())
    fsync_folder(folder)


def manifest_digests(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 from the folder's manifest; a one-line CheckpointError if it is missing
    (the folder was never committed) or malformed."""
    manifest = folder / MANIFEST
    try:
        text = manifest.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: has no {MANIFEST}, so its write never finished (or it is not a "
                              f"checkpoint folder); it cannot be used") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    digests = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not is_plain_name(name):
            raise CheckpointError(f"{manifest}: malformed line {line[:80]!r}; the manifest is corrupt")
        digests[name] = digest.lower()
    if METADATA not in digests:
        raise CheckpointError(f"{manifest}: does not list {METADATA}; the manifest is corrupt")
    return digests


def is_plain_name(name: str) -> bool:
    """A file directly inside the folder: no path separators, not the manifest itself."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..", MANIFEST)


def check_digests(folder: Path) -> dict[str, str]:
    """Every file the manifest lists exists with its digest; returns the manifest. Raises a one-line
    CheckpointError naming the first file at fault. Files are hashed in parallel (hashlib releases
    the GIL)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    digests = manifest_digests(folder)
    names = sorted(digests)
    with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
        found = list(pool.map(lambda name: _digest_or_problem(folder / name), names))
    for name, result in zip(names, found):
        if result.startswith("!"):
            raise CheckpointError(result[1:])
        if result != digests[name]:
            raise CheckpointError(f"{folder / name}: checksum mismatch; the file is corrupt or truncated "
                                  f"(or was changed after it was written)")
    return digests


def _digest_or_problem(path: Path) -> str:
    """The file's SHA-256, or "!" and a one-line problem."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return f"!{path}: missing, though {MANIFEST} lists it; the checkpoint is incomplete"
    except OSError as e:
        return f"!{path}: cannot read it ({e.strerror or e})"


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that holds (or was meant to hold) a checkpoint: it has a manifest or a DCP index."""
    return path.is_dir() and ((path / MANIFEST).exists() or (path / METADATA).exists())


def folder_nbytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def delete_folder(folder: Path) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under its name: it is
    renamed aside (and the rename made durable) before its files go."""
    aside = folder.with_name(f".{folder.name}.deleting.{os.getpid()}")
    os.replace(folder, aside)
    fsync_folder(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_unfinished(folder: Path) -> list[Path]:
    """Delete the temp folders of interrupted writes and deletions, and step folders without a
    manifest (never committed); returns what was removed. Other folders are left alone."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        uncommitted = STEP_FOLDER_PATTERN.match(entry.name) and not (entry / MANIFEST).exists()
        if entry.is_dir() and not entry.is_symlink() and (_UNFINISHED.match(entry.name) or uncommitted):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        fsync_folder(folder)
    return removed
