"""Checkpoint folders as files on disk: their manifest, their digests, their removal, and the
leftovers of interrupted writes. What is inside the files is :mod:`.sharded`'s business.

Kept apart from :mod:`.sharded` because that one imports ``torch.distributed.checkpoint``
(more than half a second): listing, pruning or cleaning a run's folder must not pay for it.

A committed folder holds ``MANIFEST.sha256``, written last: one ``<sha256>  <file name>`` line per
other file, so ``cd step_00000500 && sha256sum -c MANIFEST.sha256`` checks it by hand too. A
folder without one was never committed.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import DELETING, WRITING, temp_target
from ..errors import CheckpointError
from .files import STEP_FOLDER_PATTERN, file_sha256
from .storage import FOLDER, LOCAL, Storage, join

__all__ = ["MANIFEST", "METADATA", "check_digests", "delete_folder", "file_sha256", "folder_nbytes",
           "is_checkpoint_folder", "is_plain_name", "manifest_digests", "remove_unfinished", "write_manifest"]

MANIFEST = "MANIFEST.sha256"
METADATA = ".metadata"  # DCP's index of the folder


def write_manifest(folder: Path, digests: dict[str, str], storage: Storage = LOCAL) -> None:
    """``MANIFEST.sha256`` in ``folder``, published whole (locally: temp file, fsync, rename, fsync the folder)."""
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    new = storage.create(folder / MANIFEST)
    try:
        new.file.write(lines.encode())
        new.publish()
    finally:
        new.discard()  # a no-op once published


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


def delete_folder(folder: Path, storage: Storage = LOCAL) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under its name."""
    storage.remove_folder(folder)


def remove_unfinished(folder: Path, storage: Storage = LOCAL) -> list[Path]:
    """Delete the temp folders of interrupted writes and deletions of step folders, and step folders
    without a manifest (never committed); returns what was removed. Other folders are left alone."""
    removed: list[Path] = []
    for entry in sorted(storage.list(folder), key=lambda e: e.name):
        if entry.kind != FOLDER or entry.link:
            continue
        target = temp_target(entry.name, (WRITING, DELETING))
        unfinished = target is not None and STEP_FOLDER_PATTERN.match(target)
        uncommitted = STEP_FOLDER_PATTERN.match(entry.name) and \
            storage.kind(join(join(folder, entry.name), MANIFEST)) is None
        path = join(folder, entry.name)
        if unfinished:  # temp folders exist only on a local disk, and need no care: nothing counts them
            shutil.rmtree(path, ignore_errors=True)
        elif uncommitted:
            try:
                storage.remove_folder(path)
            except OSError:
                continue  # left for the next start; resume skips it meanwhile (it has no manifest)
        if unfinished or uncommitted:
            removed.append(path)
    if removed:
        storage.sync(folder)
    return removed
