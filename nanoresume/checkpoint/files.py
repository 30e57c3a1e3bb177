"""Checkpoint files: the commit protocol that writes them and the verified, safe load that reads them.

Knows nothing about GPTs: it saves and loads dicts of tensors and plain values.

Commit protocol for ``name.pt`` (a crash at any point leaves the old state or the
new one, never a half file under a checkpoint's name):

1. ``torch.save`` into ``.name.pt.tmp.<pid>`` in the same folder, hashing every byte
   as it is written and embedding the digest in the file itself
   (:mod:`~nanoresume.checkpoint.fileformat`); flush; fsync. Torch's own CRC-32 of each
   zip record is left out (zeros): it cost a third of the serialization, torch.load never
   reads it, and the SHA-256 covers every byte anyway.
2. Remove the old ``name.pt.sha256`` (if overwriting), ``os.replace`` the temp file onto
   ``name.pt``, fsync the folder: committed.
3. Write ``name.pt.sha256`` (``sha256sum -c`` format, the plain SHA-256 of the file) by the
   same temp-fsync-replace steps. The sidecar is an extra: a kill before it leaves the file
   without one, and the file still verifies by itself. The checkpoint manager writes it
   after the commit, off the training thread.

Those steps are the local disk's (:data:`~.storage.LOCAL`). Every function here takes a
``storage`` (:class:`~.storage.Storage`) and a path or URL: on an object store the file is
uploaded under its final key and appears whole when the upload completes, with no rename.

Loading opens the file once and hashes it through a memory map while it unpickles that
same open file with ``weights_only=True``; the state is returned only if the digest the
file carries (or, for files written before digests were embedded, its ``.sha256``)
matches. What is checked is what is loaded, even if the name is swapped in between, and
a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Collection, Iterator, Optional

import torch

from ..atomic import temp_target
from ..errors import REMEDY_FREE_SPACE, REMEDY_MOVE_OBSTACLE, CheckpointError, CheckpointWriteError
from .fileformat import DigestingWriter, Digests, digests
from .observe import CheckpointObserver, observers
from .storage import (FILE, FOLDER, LOCAL, NotAFileError, P, Reading, Storage, Writing, as_path, join, name_of,
                      parent_of)

# The header every nanoresume file starts with: its format version and its kind ("train", "weights",
# "checkpointer"). This package owns it; what a version means for a training state is written
# in nanoresume.training_state. A file of a newer version than this is refused as "upgrade".
FORMAT_VERSION = 2
FORMAT_VERSION_KEY = "format_version"
KIND_KEY = "kind"
CHECKSUM_SUFFIX = ".sha256"
STEP_PATTERN = re.compile(r"^step_(\d{8,})\.pt$")
STEP_FOLDER_PATTERN = re.compile(r"^step_(\d{8,})$")  # a sharded checkpoint (see sharded.py)
FREE_SPACE_ADVICE = "free some space or save elsewhere, then resume; earlier checkpoints are intact"
# torch words a refused global differently across versions ("Unsupported global: GLOBAL os.system",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"); both name it after GLOBAL.
_UNSAFE_GLOBAL = re.compile(r"\bGLOBAL\s+([\w.]+)")


def step_path(folder: Path, step: int) -> Path:
    """``folder/step_00000500.pt``: zero-padded so that sorted names are sorted steps."""
    return folder / f"step_{step:08d}.pt"


def step_folder_path(folder: Path, step: int) -> Path:
    """``folder/step_00000500``: a sharded checkpoint, named like a file one without ``.pt``."""
    return folder / f"step_{step:08d}"


def step_of(path: Path) -> int:
    match = STEP_PATTERN.match(name_of(path)) or STEP_FOLDER_PATTERN.match(name_of(path))
    assert match, f"{path} is not a step checkpoint name"
    return int(match.group(1))


def checksum_path(path: P) -> P:
    return join(parent_of(path), name_of(path) + CHECKSUM_SUFFIX)


# ---- writing -------------------------------------------------------------------------------------

def save_atomically(obj: dict[str, Any], path: Path, checksum_file: bool = True, storage: Storage = LOCAL,
                   observer: Optional[CheckpointObserver] = None) -> str:
    """Write ``obj`` to ``path`` by the commit protocol above; returns the digest the file carries.

    ``checksum_file=False`` leaves step 3 (the ``.sha256``) to the caller (:func:`write_checksum_file`).
    ``observer`` (and every observer registered with :func:`~.observe.observe`) sees the write.

    Raises :class:`CheckpointWriteError` on any failure (disk full, I/O error, a value that
    cannot be serialized); the temp file is removed and earlier files stay intact.
    """
    path = as_path(path)
    _refuse_non_file_in_the_way(path, storage)
    watcher = observers(observer)
    new: Optional[Writing] = None
    try:
        new = storage.create(path)
        progress = None if watcher is None else (lambda written: watcher.on_write_progress(path, written))
        writer = DigestingWriter(new.file, on_progress=progress)
        try:
            with _zip_crc_skipped():
                torch.save(obj, writer)
            digest = writer.finish()
        except Exception as e:
            if writer.error is not None and writer.error is not e:
                raise writer.error from None  # the real cause, not torch's "file write failed"
            raise
        finally:
            writer.close()
        if watcher is not None:
            watcher.before_commit(path)
        storage.remove(checksum_path(path))  # a stale .sha256 must not outlive the file it was for
        new.publish()
        if watcher is not None:
            watcher.after_commit(path)
        if checksum_file:
            write_checksum_file(path, storage)
        return digest
    except OSError as e:
        _discard(new)
        raise CheckpointWriteError(describe_write_failure(path, e, state_nbytes(obj)), FREE_SPACE_ADVICE,
                                   REMEDY_FREE_SPACE, folder=parent_of(path)) from None
    except Exception as e:
        _discard(new)
        raise CheckpointWriteError(f"could not serialize checkpoint {name_of(path)} in {parent_of(path)}: "
                                   f"{_describe(e)}", "earlier checkpoints are intact") from e
    except BaseException:
        _discard(new)
        raise


def _discard(new: Optional[Writing]) -> None:
    if new is not None:
        new.discard()


@contextlib.contextmanager
def _zip_crc_skipped() -> Iterator[None]:
    """torch.save without its per-record CRC-32 (torch >= 2.6; older versions compute it anyway).

    The setting is process-wide for the duration: a torch.save of the caller's own on another
    thread meanwhile also gets zero CRCs, which torch.load accepts.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    with config.patch({"save.compute_crc32": False}):
        yield


def _refuse_non_file_in_the_way(path: Path, storage: Storage) -> None:
    kind = storage.kind(path)
    if kind not in (None, FILE):
        what = "a folder" if kind == FOLDER else "not a regular file"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {name_of(path)} there is {what}",
                                   f"move it out of {parent_of(path)}", REMEDY_MOVE_OBSTACLE, folder=parent_of(path))


def _describe(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "out of memory while serializing (MemoryError)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def write_checksum_file(path: Path, storage: Storage = LOCAL) -> str:
    """Write ``path.sha256`` (the ``sha256sum`` format) for a committed file; returns the SHA-256."""
    digest = file_sha256(path, storage)
    new = storage.create(checksum_path(path))
    try:
        new.file.write(_checksum_lines([digest], name_of(path)))
        new.publish()
    finally:
        new.discard()  # a no-op once published
    return digest


def file_sha256(path: Path, storage: Storage = LOCAL) -> str:
    """The plain SHA-256 of a file, as ``sha256sum`` prints it."""
    with storage.open_read(path) as reading:
        return hashlib.sha256(memoryview(reading.data).cast("B")).hexdigest()


def _checksum_lines(digests: list[str], target_name: str) -> bytes:
    return "".join(f"{d}  {target_name}\n" for d in digests).encode()


def accepted_digests(sidecar: Path, storage: Storage = LOCAL) -> list[str]:
    """Digests listed in a checksum file (empty when it is missing or unreadable)."""
    try:
        with storage.open_read(sidecar) as reading:
            lines = bytes(reading.data).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0].lower() for line in lines if line.strip()]


def state_nbytes(obj: Any) -> int:
    """Bytes of tensor data in a nested state (what a save needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def describe_write_failure(path: Path, error: OSError, needed: Optional[int] = None) -> str:
    """One line for a checkpoint (file or folder) that could not be written: the reason, what it needed
    (when known) and the free space left where it was going."""
    try:
        free = f"{shutil.disk_usage(parent_of(path)).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or str(error)
    room = f"about {needed / 1e6:,.1f} MB needed, {free}" if needed is not None else free
    return f"could not write checkpoint {name_of(path)} in {parent_of(path)}: {reason} ({room})"


# ---- reading -------------------------------------------------------------------------------------

def load_checkpoint(path: Path, map_location: Any = "cpu", storage: Storage = LOCAL) -> dict[str, Any]:
    """Verify, then safely unpickle a checkpoint; every problem is a one-line :class:`CheckpointError`.

    Tensors may be backed by a private, read-only-on-disk memory map of the file (copy on
    write), which makes loading about as fast as a plain ``torch.load``.
    """
    path = as_path(path)
    with _reading(path, storage) as reading, ThreadPoolExecutor(1, thread_name_prefix="nanoresume-verify") as pool:
        found = pool.submit(digests, reading.data)  # hashing and unpickling overlap: both read the same pages
        try:
            state, unreadable = _unpickle(path, reading, map_location), None
        except CheckpointError as e:
            state, unreadable = None, e
        _check_digest(path, found.result(), storage)  # a corrupt file is named as corrupt, not as unreadable
        if unreadable is not None:
            raise unreadable
    if not isinstance(state, dict) or FORMAT_VERSION_KEY not in state or KIND_KEY not in state:
        raise CheckpointError(f"{path}: not a nanoresume checkpoint (no {FORMAT_VERSION_KEY}/{KIND_KEY})")
    version = state[FORMAT_VERSION_KEY]
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer nanoresume (format {version}, "
                              f"this one reads up to {FORMAT_VERSION}); upgrade nanoresume")
    return state


def read_verified(path: Path, storage: Storage = LOCAL) -> bytes:
    """The file's bytes, only if they verify (embedded digest, or the ``.sha256`` of an older file)."""
    path = as_path(path)
    with _reading(path, storage) as reading:
        _check_digest(path, digests(reading.data), storage)
        return bytes(reading.data)


def verify_file(path: Path, storage: Storage = LOCAL) -> Digests:
    """Check a file's digest without unpickling it; raises CheckpointError, returns what was found."""
    path = as_path(path)
    with _reading(path, storage) as reading:
        found = digests(reading.data)
        _check_digest(path, found, storage)
        return found


@contextlib.contextmanager
def _reading(path: Path, storage: Storage) -> Iterator[Reading]:
    """``storage.open_read(path)``, with every reason it cannot be read as a one-line CheckpointError."""
    with contextlib.ExitStack() as stack:
        try:
            reading = stack.enter_context(storage.open_read(path))
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as "
                                  f"OUT/checkpoints/step_00000500.pt") from None
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such checkpoint file") from None
        except NotAFileError:
            raise CheckpointError(f"{path}: not a regular file; pass a checkpoint file") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
        if len(reading.data) == 0:
            raise CheckpointError(f"{path}: file is empty (0 bytes); its write never finished")
        yield reading


def _check_digest(path: Path, found: Digests, storage: Storage) -> None:
    if found.has_trailer:
        if not found.self_consistent:
            raise CheckpointError(f"{path}: checksum mismatch; the file is corrupt or truncated "
                                  f"(or was changed after it was written)")
        return
    sidecar = checksum_path(path)
    accepted = accepted_digests(sidecar, storage)
    if not accepted:
        raise CheckpointError(f"{path}: carries no checksum of its own and has no {name_of(sidecar)} beside it, so "
                              f"it cannot be verified (it is truncated, was not written by nanoresume, or is an "
                              f"older file copied without its checksum file)")
    if found.whole not in accepted:
        raise CheckpointError(f"{path}: checksum mismatch; the file is corrupt or truncated "
                              f"(or was changed after it was written)")


def _unpickle(path: Path, reading: Reading, map_location: Any) -> Any:
    try:
        if reading.local_name is not None:
            try:  # the same open file (not the name, which may have been swapped), mapped by torch itself
                return torch.load(reading.local_name, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise  # otherwise an old file torch cannot map: fall back to the verified bytes below
        return torch.load(io.BytesIO(bytes(reading.data)), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (its data does not unpickle)") from None
        raise CheckpointError(f"{path}: refused, it asks to import {unsafe.group(1)}, and loading it could run "
                              f"code; a nanoresume checkpoint holds only tensors and plain values") from None
    except Exception as e:  # torch raises RuntimeError and friends for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


# ---- leftovers -----------------------------------------------------------------------------------

def remove_leftovers(folder: Path, owned: Collection[str] = (), storage: Storage = LOCAL) -> list[Path]:
    """Delete temp files of interrupted writes and checksum files whose checkpoint is gone.

    Only names this package creates are touched: step checkpoint files and the names in ``owned``
    (``best.pt``), their ``.sha256`` files, and temp files of either. Unrelated files are left alone.
    """
    def ours(name: str) -> bool:
        name = name[: -len(CHECKSUM_SUFFIX)] if name.endswith(CHECKSUM_SUFFIX) else name
        return bool(STEP_PATTERN.match(name)) or name in owned

    removed: list[Path] = []
    for entry in storage.list(folder):
        name = entry.name
        if entry.kind != FILE:
            continue
        target = temp_target(name)
        orphan_sidecar = name.endswith(CHECKSUM_SUFFIX) and ours(name) and \
            storage.kind(join(folder, name[: -len(CHECKSUM_SUFFIX)])) is None
        if (target is not None and ours(target)) or orphan_sidecar:
            storage.remove(join(folder, name))
            removed.append(join(folder, name))
    return removed
