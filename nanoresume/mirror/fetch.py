"""The tools' read of a mirror: ``ckpt list|verify URL``, ``sample --ckpt URL/best.pt``, ``evaluate --ckpt URL/...``.

Each object is downloaded to a cache folder (``$XDG_CACHE_HOME/nanoresume/mirror/<hash of the URL>``) under
a temp name, verified with the caller's check (the same safe load as a local checkpoint: digest first,
then ``weights_only``, so nothing in it runs code), and only then renamed; a cached copy whose size
matches the mirror's is checked again rather than downloaded again. ::

    path = fetch("s3://bucket/run/best.pt", options, check=load_checkpoint)   # a local, verified copy
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

from ..checkpoint import CheckpointError
from .remote import Mirror, RemoteCheckpoint
from .restore import download_checkpoint
from .store import MirrorError, describe_failure

Check = Callable[[Path], Any]


def is_url(text: str) -> bool:
    """Whether a tool's argument names a mirror's URL (``s3://...``, ``gs://...``) rather than a local path."""
    return "://" in str(text)


def cache_folder(url: str) -> Path:
    """Where the tools keep what they downloaded from ``url`` (one folder per mirror)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nanoresume" / "mirror" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def open_mirror(url: str, options: Optional[dict[str, Any]] = None) -> Mirror:
    """A mirror to read; a missing extra or bad URL is a one-line MirrorError."""
    return Mirror(url, options)


def safe_load(path: Path) -> Any:
    """The check for a model to sample or evaluate: a file's digest and ``weights_only`` load, a folder's
    manifest and index (as training checks them)."""
    from ..checkpoint import load_checkpoint
    from ..loading import load_valid

    return load_valid(path, tensors=False) if Path(path).is_dir() else load_checkpoint(path)


def local_checkpoint(text: str, options: Optional[dict[str, Any]] = None) -> Path:
    """A tool's ``--ckpt``: a local path as given, or a URL fetched to the cache and verified."""
    return fetch(text, options, safe_load) if is_url(text) else Path(text)


def fetch(url: str, options: Optional[dict[str, Any]], check: Check) -> Path:
    """A verified local copy of the checkpoint file or folder at ``url``; raises CheckpointError (it does
    not verify), MirrorError (it cannot be read) or a UserError naming a missing object."""
    parent, _, base = url.rstrip("/").rpartition("/")
    if not parent or not base:
        raise MirrorError(f"{url}: name a checkpoint under a mirror's URL, e.g. s3://bucket/run/best.pt")
    mirror = open_mirror(parent, options)
    try:
        found = mirror.store.info(base)
        kind = "file" if found is not None else "folder" if mirror.store.walk_files(base) else None
    except OSError as e:
        raise MirrorError(describe_failure(parent, e).replace(f"--mirror {parent}", url, 1)) from None
    if kind is None:
        raise MirrorError(f"{url}: no such object on the mirror; `nanoresume ckpt list {parent}` lists what it "
                          f"holds")
    return fetch_checkpoint(mirror, RemoteCheckpoint(0, base, kind, int(found["size"]) if found else None), check)


def fetch_checkpoint(mirror: Mirror, candidate: RemoteCheckpoint, check: Check) -> Path:
    """A verified local copy of ``candidate`` (one of ``mirror.checkpoints()``, or any object under it)
    in the cache; raises CheckpointError naming the mirror's object when it does not verify."""
    folder = cache_folder(mirror.url) / candidate.name.rpartition("/")[0]
    cached = folder / candidate.name.rpartition("/")[2]
    if candidate.kind == "file" and cached.is_file() and cached.stat().st_size == candidate.size:
        try:
            check(cached)
            return cached
        except CheckpointError:
            pass  # a stale or damaged copy: download it again
    return download_checkpoint(mirror, candidate, folder, check)
