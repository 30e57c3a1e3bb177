"""Atomic, checksummed, safely-loaded checkpoint files, and the folder policy around them.

Knows nothing about GPTs: it saves and loads dicts of tensors and plain values.

Commit protocol for ``name.pt`` (a crash at any point leaves the old state or the
new one, never a half file under a checkpoint's name):

1. ``torch.save`` into ``.name.pt.tmp.<pid>`` in the same folder, hashing every
   byte (SHA-256) as it is written; flush; fsync.
2. Write the checksum file ``name.pt.sha256`` (``sha256sum -c`` format) by the same
   temp-fsync-replace steps. When overwriting (``best.pt``) it lists the old digest
   too, so whichever file is in place during the swap still verifies.
3. ``os.replace`` the temp file onto ``name.pt``; fsync the folder.
4. (Overwrite only) rewrite the checksum file with the new digest alone.

A file counts only when its digest is listed in its checksum file; anything else
is skipped with a warning. Loading reads the bytes once, checks the digest, then
unpickles them with ``weights_only=True``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .atomic import fsync_folder, remove_quietly, temp_path, write_file_atomically
from .errors import CheckpointError, CheckpointWriteError

FORMAT_VERSION = 1
CHECKSUM_SUFFIX = ".sha256"
STEP_PATTERN = re.compile(r"^step_(\d{8,})\.pt$")
# Temp files this module creates: ".<target>.tmp.<pid>" for targets it owns.
_TEMP_PATTERN = re.compile(r"^\.(step_\d{8,}\.pt|best\.pt|config\.json)(\.sha256)?\.tmp\.\d+$")

# Test-only: called with the number of bytes written so far after every chunk
# of a checkpoint write. Tests use it to slow writes down (to land a kill inside
# one) or to raise OSError (disk full). Production code never sets it.
testing_write_hook: Optional[Callable[[int], None]] = None


def step_path(folder: Path, step: int) -> Path:
    """``folder/step_00000500.pt``: zero-padded so that sorted names are sorted steps."""
    return folder / f"step_{step:08d}.pt"


def step_of(path: Path) -> int:
    match = STEP_PATTERN.match(path.name)
    assert match, f"{path} is not a step checkpoint name"
    return int(match.group(1))


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)



class _HashingWriter:
    """A write-only file object that hashes what passes through, so no second read is needed."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.written = 0
        self.error: Optional[OSError] = None  # torch's C++ writer hides the original exception

    def write(self, data: bytes) -> int:
        try:
            self.file.write(data)
            self.sha256.update(data)
            self.written += len(data)
            if testing_write_hook is not None:
                testing_write_hook(self.written)
        except OSError as e:
            self.error = e
            raise
        return len(data)

    def flush(self) -> None:
        self.file.flush()


def save_atomically(obj: dict[str, Any], path: Path) -> str:
    """Write ``obj`` to ``path`` by the commit protocol above; returns its SHA-256 hex digest.

    Raises :class:`CheckpointWriteError` (with folder, bytes needed and free) on
    any I/O failure; the temp file is removed and earlier files stay intact.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(obj, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path, writer.sha256.hexdigest())
        return writer.sha256.hexdigest()
    except OSError as e:
        remove_quietly(tmp)
        raise CheckpointWriteError(_write_failure(path, e, state_nbytes(obj)),
                                   "free some space or choose another --out-dir, then rerun with --resume auto. "
                                   "Earlier checkpoints are intact") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def _commit(tmp: Path, path: Path, digest: str) -> None:
    sidecar = checksum_path(path)
    previous = accepted_digests(sidecar) if path.exists() else []
    write_file_atomically(sidecar, _checksum_lines([digest] + [d for d in previous if d != digest], path.name))
    fsync_folder(path.parent)  # the new digest is durable before the file it vouches for appears
    os.replace(tmp, path)
    fsync_folder(path.parent)
    if previous:
        write_file_atomically(sidecar, _checksum_lines([digest], path.name))
        fsync_folder(path.parent)


def _checksum_lines(digests: list[str], target_name: str) -> bytes:
    return "".join(f"{d}  {target_name}\n" for d in digests).encode()




def accepted_digests(sidecar: Path) -> list[str]:
    """Digests listed in a checksum file (empty when it is missing or unreadable)."""
    try:
        lines = sidecar.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0].lower() for line in lines if line.strip()]


def read_verified(path: Path) -> bytes:
    """The file's bytes, only if their SHA-256 is listed in the checksum file beside it."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as OUT/checkpoints/step_00000500.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    sidecar = checksum_path(path)
    try:
        payload = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if not payload:
        raise CheckpointError(f"{path}: file is empty (0 bytes); its write never finished")
    accepted = accepted_digests(sidecar)
    if not accepted:
        raise CheckpointError(f"{path}: no checksum file {sidecar.name} beside it, so it cannot be verified "
                              f"(its commit did not finish, or it was copied without it)")
    if hashlib.sha256(payload).hexdigest() not in accepted:
        raise CheckpointError(f"{path}: checksum mismatch; the file is corrupt or truncated "
                              f"(or was changed after it was written)")
    return payload


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify, then safely unpickle a checkpoint; every problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    payload = read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(e))
        if unsafe is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (its data does not unpickle)") from None
        raise CheckpointError(f"{path}: refused, it asks to import {unsafe.group(1)}, and loading it could run "
                              f"code; a nanoresume checkpoint holds only tensors and plain values") from None
    except Exception as e:  # torch raises RuntimeError and friends for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state or "kind" not in state:
        raise CheckpointError(f"{path}: not a nanoresume checkpoint (no format_version/kind)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer nanoresume (format {state['format_version']}, "
                              f"this one reads up to {FORMAT_VERSION}); upgrade nanoresume")
    return state


def state_nbytes(obj: Any) -> int:
    """Bytes of tensor data in a nested state (what a save needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _write_failure(path: Path, error: OSError, needed: int) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or str(error)
    return f"could not write checkpoint {path.name} in {path.parent}: {reason} (about {needed / 1e6:,.1f} MB needed, {free})"


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete temp files of interrupted writes and checksum files whose checkpoint is gone.

    Only names this module creates are touched; unrelated files are left alone.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        orphan_sidecar = name.endswith(CHECKSUM_SUFFIX) and (
            STEP_PATTERN.match(name[: -len(CHECKSUM_SUFFIX)]) or name == "best.pt" + CHECKSUM_SUFFIX
        ) and not entry.with_name(name[: -len(CHECKSUM_SUFFIX)]).exists()
        if entry.is_file() and (_TEMP_PATTERN.match(name) or orphan_sidecar):
            remove_quietly(entry)
            removed.append(entry)
    return removed


@dataclass(frozen=True)
class StepFile:
    step: int
    path: Path


class CheckpointManager:
    """The step checkpoints of one run: when to save, where, how many to keep, which to resume.

    ``maybe_save(step, build_state)`` is called after every optimizer step; the
    manager decides (interval, forced, already saved) and calls ``build_state``
    only when it writes.
    """

    def __init__(self, folder: Path, interval: int, keep_last: int) -> None:
        self.folder = Path(folder)
        self.interval = interval
        self.keep_last = keep_last
        self.last_saved_step: Optional[int] = None
        self.last_save_seconds = 0.0

    def list(self) -> list[StepFile]:
        """Step checkpoints present (verified or not), oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(STEP_PATTERN.match(p.name), p) for p in self.folder.iterdir()]
        return sorted((StepFile(int(m.group(1)), p) for m, p in found if m and p.is_file()), key=lambda s: s.step)

    def is_due(self, step: int) -> bool:
        return step % self.interval == 0

    def maybe_save(self, step: int, build_state: Callable[[], dict[str, Any]], force: bool = False) -> Optional[Path]:
        """Save if ``step`` is on the interval or ``force`` is set, unless this step is already saved."""
        if self.last_saved_step == step or not (force or self.is_due(step)):
            return None
        return self.save(step, build_state())

    def save(self, step: int, state: dict[str, Any]) -> Path:
        started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = step_path(self.folder, step)
        save_atomically(state, path)
        self.last_saved_step = step
        self.prune(keep=path)
        self.last_save_seconds = time.perf_counter() - started
        return path

    def prune(self, keep: Path) -> list[Path]:
        """Keep ``keep`` (just committed) and the newest ``keep_last`` step checkpoints up to it;
        delete older ones (file, then checksum)."""
        current = [s for s in self.list() if s.path != keep and s.step <= step_of(keep)]
        deleted = []
        for old in current[: max(0, len(current) - (self.keep_last - 1))]:
            remove_quietly(old.path)
            remove_quietly(checksum_path(old.path))
            deleted.append(old.path)
        if deleted:
            fsync_folder(self.folder)
        return deleted

    def set_aside_after(self, step: int) -> list[Path]:
        """Move step checkpoints newer than ``step`` to ``abandoned/``: after resuming from an older
        step (a corrupt newer file, or an explicit --resume PATH) they belong to a timeline this run
        left, and must neither count for --keep-last nor be picked by a later --resume auto."""
        moved = []
        for newer in (s for s in self.list() if s.step > step):
            target = self.folder / "abandoned"
            target.mkdir(exist_ok=True)
            for path in (newer.path, checksum_path(newer.path)):
                if path.exists():
                    os.replace(path, target / path.name)
            moved.append(target / newer.path.name)
        if moved:
            fsync_folder(self.folder)
        return moved


def resolve_resume(
    mode: str,
    manager: CheckpointManager,
    warn: Callable[[str], None],
    load: Callable[[Path], dict[str, Any]] = load_checkpoint,
) -> Optional[tuple[Path, dict[str, Any]]]:
    """Which checkpoint a run starts from, as ``(path, state)``, or None for a fresh start.

    - ``"auto"``: the newest step checkpoint that verifies; each newer one that
      does not is skipped with a warning. None if there is none.
    - ``"none"``: None, but refuse (CheckpointError) if the folder already holds
      step checkpoints, so a finished run is never clobbered by accident.
    - anything else: a path that must load, or CheckpointError.
    """
    if mode == "none":
        existing = manager.list()
        if existing:
            raise CheckpointError(
                f"{manager.folder} already holds {len(existing)} checkpoint(s) (newest {existing[-1].path.name}); "
                f"pass --resume auto to continue that run, or choose another --out-dir")
        return None
    if mode == "auto":
        for candidate in reversed(manager.list()):
            try:
                return candidate.path, _require_train_state(candidate.path, load(candidate.path))
            except CheckpointError as e:
                warn(f"skipping {e}")
        return None
    path = Path(mode).expanduser()
    return path, _require_train_state(path, load(path))


def _require_train_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    if state.get("kind") != "train":
        raise CheckpointError(f"{path}: holds {state.get('kind')!r} weights, not a full training state; "
                              f"resume from a checkpoints/step_*.pt file")
    return state
