"""Reading a run back from its mirror on a new machine: which checkpoints count, the download into OUT
(temp name, verify, commit), and the run's other files (config.json, metrics.jsonl, TensorBoard, best.pt).

A checkpoint on the mirror counts only at or below the pointer's step (``LATEST.json`` is written
after its checkpoint was uploaded and checked); anything newer, a pointer naming a missing object, or
a mirror with no pointer is skipped with one line. A downloaded file is verified and unpickled with
the same safe load as a local one (``weights_only``, digest checked) before it gets its name in OUT,
so a corrupt, truncated or malicious checkpoint is refused there and never runs code.

Call at start-up, before the local ``--resume auto``::

    restored = find_newest_on_mirror(mirror, run_dir.checkpoints, warn, newer_than=newest_local_step)
    if restored:
        restore_run_files(mirror, run_dir.root, restored.step, warn)
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..atomic import fsync_folder, remove_quietly, temp_path, write_file_atomically
from ..checkpoint import CheckpointError, checksum_path, load_checkpoint
from ..checkpoint.folders import MANIFEST, check_digests, delete_folder, is_plain_name
from ..metrics import scan_for_cut
from ..rundir import RunDir
from ..training_state import require_train_state
from .remote import POINTER, Mirror, Pointer, RemoteCheckpoint
from .store import MirrorError, describe_failure

Warn = Callable[[str], None]
Check = Callable[[Path], Any]


@dataclass(frozen=True)
class Restored:
    """A checkpoint downloaded from the mirror and committed into OUT."""

    step: int
    path: Path  # where it now is, in OUT/checkpoints
    source: str  # where it came from: the mirror's URL and name


def mirror_candidates(mirror: Mirror, warn: Warn) -> list[RemoteCheckpoint]:
    """The mirror's checkpoints a resume may use, newest first: those at or below the pointer's step.
    Warns once for each object newer than the pointer, for a pointer naming a missing object, and
    once for a mirror that holds checkpoints but no pointer."""
    with ThreadPoolExecutor(1, thread_name_prefix="nanoresume-mirror-list") as pool:
        listing = pool.submit(mirror.checkpoints)  # two round trips at once: the listing and the pointer
        pointer, problem = _read_pointer(mirror)
        listed = listing.result()
    return _usable(mirror, listed, pointer, problem, warn)


def find_newest_on_mirror(mirror: Mirror, folder: Path, warn: Warn, newer_than: Optional[int] = None,
                          check: Optional[Check] = None) -> Optional[Restored]:
    """Download the newest checkpoint on the mirror that verifies into ``folder`` (OUT/checkpoints) and
    return it; None if the mirror has none newer than ``newer_than`` (the newest local step that
    verifies). Each one that fails is skipped with a warning. Network failures raise MirrorError.

    The pointer's own checkpoint is downloaded while the mirror is listed (the listing only finds
    older ones to fall back to, and what to warn about)."""
    with ThreadPoolExecutor(1, thread_name_prefix="nanoresume-mirror-list") as pool:
        listing = pool.submit(mirror.checkpoints)
        pointer, problem = _read_pointer(mirror)
        first: Optional[object] = None
        if pointer is not None and (newer_than is None or pointer.step > newer_than):
            first = _attempt(mirror, RemoteCheckpoint(pointer.step, pointer.name, pointer.kind, pointer.size),
                             folder, check)
        listed = listing.result()
    candidates = _usable(mirror, listed, pointer, problem, warn)
    if isinstance(first, Restored):
        return first
    for candidate in candidates:
        if newer_than is not None and candidate.step <= newer_than:
            return None
        outcome = first if pointer is not None and candidate.name == pointer.name and first is not None else \
            _attempt(mirror, candidate, folder, check)
        if isinstance(outcome, Restored):
            return outcome
        warn(f"skipping {outcome}")
    return None


def _read_pointer(mirror: Mirror) -> tuple[Optional[Pointer], Optional[str]]:
    try:
        return mirror.pointer(), None
    except (ValueError, KeyError) as e:
        return None, str(e)


def _usable(mirror: Mirror, listed: list[RemoteCheckpoint], pointer: Optional[Pointer], problem: Optional[str],
            warn: Warn) -> list[RemoteCheckpoint]:
    where = mirror.store.where
    if problem is not None:
        warn(f"skipping {where(POINTER)}: unreadable ({problem}); it is written last, so no checkpoint can be "
             f"trusted without it")
        return []
    if pointer is None:
        if listed:
            warn(f"skipping {len(listed)} checkpoint(s) on {mirror.url} (newest {listed[-1].name}): the mirror has "
                 f"no {POINTER}, so none of their uploads is known to have finished")
        return []
    if pointer.name not in {c.name for c in listed}:
        warn(f"skipping {where(pointer.name)}: {POINTER} names it (step {pointer.step}) but it is not on the "
             f"mirror; falling back to an older one")
    for newer in (c for c in listed if c.step > pointer.step):
        warn(f"skipping {where(newer.name)}: newer than {POINTER} (step {pointer.step}), so its upload never "
             f"finished")
    return [c for c in reversed(listed) if c.step <= pointer.step]


def _attempt(mirror: Mirror, candidate: RemoteCheckpoint, folder: Path, check: Optional[Check]) -> object:
    """A Restored, or the CheckpointError that says why this one cannot be used."""
    try:
        path = download_checkpoint(mirror, candidate, folder, check)
    except CheckpointError as e:
        return e
    return Restored(candidate.step, path, mirror.store.where(candidate.name))


def download_checkpoint(mirror: Mirror, candidate: RemoteCheckpoint, folder: Path,
                        check: Optional[Check] = None) -> Path:
    """Download one checkpoint into ``folder`` under a temp name, verify it, then commit it under its name.

    ``check(path)`` must raise CheckpointError for a checkpoint the run cannot use; by default a file
    is loaded as a local one is (digest and ``weights_only`` unpickling, then a training state's keys)
    and a folder's files are checked against its manifest. Problems are one-line CheckpointErrors
    naming the mirror's object; the temp name is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = candidate.name.rsplit("/", 1)[-1]
    target = folder / base
    source = mirror.store.where(candidate.name)
    if candidate.kind == "folder":
        tmp = folder / f".{base}.tmp.{os.getpid()}"  # the name a crash's leftovers are cleaned by
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _download_folder(mirror, candidate.name, tmp)
            _checked(check or check_digests, tmp, source)
            if target.exists():
                delete_folder(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp = temp_path(target)
        try:
            _download(mirror, candidate.name, tmp, fsync=False)
            with ThreadPoolExecutor(1, thread_name_prefix="nanoresume-mirror-fsync") as pool:
                syncing = pool.submit(_fsync_file, tmp)  # to disk while it is verified; both before the rename
                try:
                    _checked(check or _load_train_state, tmp, source)
                finally:
                    syncing.result()
            remove_quietly(checksum_path(target))  # a stale .sha256 must not outlive the file it was for
            os.replace(tmp, target)
        finally:
            remove_quietly(tmp)
    fsync_folder(folder)
    return target


def restore_run_files(mirror: Mirror, out_dir: Path, step: int, warn: Warn) -> list[str]:
    """Bring back what a new machine lacks, so that the run reads as one: ``config.json`` (if OUT has
    none), ``metrics.jsonl`` cut before step ``step + 1`` (if the mirror's is longer), TensorBoard event
    files OUT lacks or holds shorter, and ``best.pt`` (if OUT's is missing or does not verify). Returns
    the names restored; a file that fails is skipped with a warning."""
    run = RunDir(Path(out_dir))
    restored = []
    remote = mirror.store.walk_files("")
    if run.config.name in remote and not run.config.exists():
        _download_committed(mirror, run.config.name, run.config)
        restored.append(run.config.name)
    if run.metrics.name in remote and _restore_metrics(mirror, run.metrics, step):
        restored.append(run.metrics.name)
    prefix = run.tensorboard.name + "/"
    for name, size in sorted(remote.items()):
        if name.startswith(prefix) and all(is_plain_name(part) for part in name.split("/")):
            local = run.root / name
            if not local.exists() or local.stat().st_size < size:
                local.parent.mkdir(parents=True, exist_ok=True)
                _download_committed(mirror, name, local)
                restored.append(name)
    if run.best.name in remote and not _verifies(run.best):
        try:
            _download_committed(mirror, run.best.name, run.best, check=load_checkpoint)
            restored.append(run.best.name)
        except CheckpointError as e:
            warn(f"not restoring best.pt: {e}")
    return restored


# ---- helpers -------------------------------------------------------------------------------------

def _load_train_state(path: Path) -> Any:
    return require_train_state(path, load_checkpoint(path))


def _checked(check: Check, tmp: Path, source: str) -> None:
    try:
        check(tmp)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(str(tmp), source)) from None


def _download(mirror: Mirror, name: str, local: Path, fsync: bool = True) -> None:
    try:
        mirror.store.get_file(name, local)
        if fsync:
            _fsync_file(local)
    except FileNotFoundError:
        if not local.parent.is_dir():
            raise
        raise CheckpointError(f"{mirror.store.where(name)}: listed on the mirror but gone when downloaded") from None
    except OSError as e:
        raise MirrorError(describe_failure(mirror.url, e)) from None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _download_folder(mirror: Mirror, name: str, tmp: Path) -> None:
    listed = mirror.store.walk_files(name)
    if f"{name}/{MANIFEST}" not in listed:
        raise CheckpointError(f"{mirror.store.where(name)}: has no {MANIFEST}, so its upload never finished; "
                              f"it cannot be used")
    tmp.mkdir()
    for remote in sorted(listed):
        file = remote[len(name) + 1:]
        if file != MANIFEST and is_plain_name(file):
            _download(mirror, remote, tmp / file)
    _download(mirror, f"{name}/{MANIFEST}", tmp / MANIFEST)  # last, as it was written


def _download_committed(mirror: Mirror, name: str, target: Path, check: Optional[Check] = None) -> None:
    tmp = temp_path(target)
    try:
        _download(mirror, name, tmp)
        if check is not None:
            _checked(check, tmp, mirror.store.where(name))
        os.replace(tmp, target)
    finally:
        remove_quietly(tmp)
    fsync_folder(target.parent)


def _restore_metrics(mirror: Mirror, local: Path, step: int) -> bool:
    """Write the mirror's metrics.jsonl, cut before ``step + 1``, if it holds more than OUT's."""
    content = mirror.store.read(local.name)
    keep, _ = scan_for_cut(content, step + 1)
    try:
        mine = local.read_bytes()
    except FileNotFoundError:
        mine = b""
    if keep <= scan_for_cut(mine, step + 1)[0]:
        return False
    write_file_atomically(local, content[:keep])
    fsync_folder(local.parent)
    return True


def _verifies(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False
