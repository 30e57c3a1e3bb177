"""Checkpoint folders: written by every rank through ``torch.distributed.checkpoint`` (DCP), committed
all at once, verified file by file, and read without unpickling anything but DCP's own index.

Knows nothing about GPTs: it saves and loads nested dicts of tensors (or DTensors) and plain values.
The manifest, digests and removal of folders live in :mod:`.folders`, which does not import DCP.

A folder ``step_00000500/`` holds::

    .metadata          DCP's index: which chunk of which tensor lives where (a pickle)
    __<r>_0.distcp     rank r's share of the tensors, and the plain values DCP gave it to write
    MANIFEST.sha256    the SHA-256 of every file above (``sha256sum -c`` format), written last

Commit protocol (a crash at any point leaves either no folder under the step's name or a complete one):

1. every rank: DCP writes its files into ``.step_00000500.tmp.<token>/`` beside the target, and
   fsyncs each of them (rank 0 writes ``.metadata`` last);
2. every rank hashes its share of the files; rank 0 gathers the digests;
3. rank 0 writes ``MANIFEST.sha256`` (temp file, fsync, rename), fsyncs the temp folder, renames it
   to ``step_00000500``, and fsyncs the parent folder;
4. rank 0 tells every rank whether the commit happened, so all of them raise the same error if not.

Reading is stricter than DCP itself, which unpickles ``.metadata`` with a plain ``pickle.load`` and
the plain values in the shards with ``torch.load(weights_only=False)``: either could run code from a
crafted folder. Here ``.metadata`` is read by an unpickler that builds only DCP's metadata classes
(and checked to be well-formed before anything is built from it, :mod:`.dcpindex`),
and every value in the shards is read with ``weights_only=True``, whatever the manifest says.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ..errors import REMEDY_FREE_SPACE, CheckpointError, CheckpointWriteError
from .dcpindex import read_metadata
from .files import FREE_SPACE_ADVICE, describe_write_failure, file_sha256
from .folders import MANIFEST, METADATA, check_digests, write_manifest
from .observe import CheckpointObserver, observers
from .storage import LOCAL, FolderWriting

# DCP warns on every save or load without a process group; a single process is a case we intend.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ---- writing -------------------------------------------------------------------------------------

def save_folder(state: dict[str, Any], target: Path, token: str, group: Any = None,
                observer: Optional[CheckpointObserver] = None) -> None:
    """Write ``state`` as the checkpoint folder ``target`` by the protocol above; a collective: every
    rank of ``group`` calls it with its own state (None: a single process without a process group).
    ``observer`` (and every registered one) hears of it on each rank: ``before_commit`` once this
    rank's files are written, ``after_commit`` once the folder is committed.

    ``token`` names the temp folder and must be the same on every rank. Raises
    :class:`CheckpointWriteError` on every rank if any rank failed; the temp folder is then
    removed and earlier checkpoints are intact.
    """
    rank, world = _rank_and_world(group)
    watcher = observers(observer)
    new = LOCAL.create_folder(target, token)  # DCP's FileSystemWriter writes to a local folder
    tmp = Path(new.path)
    failure: Optional[str] = None
    digests: dict[str, str] = {}
    try:
        writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        metadata = dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
        names = sorted({info.relative_path for info in metadata.storage_data.values()} | {METADATA})
        if watcher is not None:
            watcher.before_commit(target)
        digests = {name: file_sha256(tmp / name) for name in names[rank::world]}
    except (Exception, dcp.api.CheckpointException) as e:  # DCP's exception is a BaseException
        failure = _describe_failure(target, e)
    everyone = _gather(group, (digests, failure))
    outcome = None
    if rank == 0:
        outcome = _commit(new, target, everyone)
    outcome = _broadcast(group, outcome)
    if outcome is not None:
        raise CheckpointWriteError(outcome, FREE_SPACE_ADVICE, REMEDY_FREE_SPACE, folder=target.parent)
    if watcher is not None:
        watcher.after_commit(target)


def _commit(new: FolderWriting, target: Path, everyone: list[tuple[dict[str, str], Optional[str]]]) -> Optional[str]:
    """Rank 0: write the manifest and publish the folder; the failure in one line, or None."""
    failures = [f"rank {rank}: {failure}" for rank, (_, failure) in enumerate(everyone) if failure]
    if not failures:
        try:
            write_manifest(Path(new.path), {name: digest for part, _ in everyone for name, digest in part.items()})
            new.publish()
            return None
        except FileExistsError:
            failures.append(f"cannot write checkpoint {target}: it already exists")
        except OSError as e:
            failures.append(f"could not commit checkpoint {target.name} in {target.parent}: {e.strerror or e}")
    new.discard()
    return failures[0] if len(failures) == 1 else f"{failures[0]} (and {len(failures) - 1} more)"


def _describe_failure(target: Path, error: BaseException) -> str:
    """One line for a failed write: DCP wraps the first cause of each rank's failure."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    if isinstance(error, OSError):
        return describe_write_failure(target, error)
    return f"could not write checkpoint {target.name} in {target.parent}: {type(error).__name__}: {error}"


def _rank_and_world(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(group: Any, value: Any) -> list[Any]:
    """Every rank's ``value`` on rank 0 (the other ranks get an empty list)."""
    if group is None:
        return [value]
    rank, world = _rank_and_world(group)
    out: Optional[list[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(value, out, dst=dist.get_global_rank(group, 0), group=group)
    return out or []


def _broadcast(group: Any, value: Any) -> Any:
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def verify_folder(folder: Path) -> dcp_metadata.Metadata:
    """Check a checkpoint folder without reading its tensors; returns DCP's index.

    Every file in the manifest must exist with its digest, ``.metadata`` must be DCP's metadata and
    nothing else, and every file it points into must be in the manifest. Each problem is a one-line
    :class:`CheckpointError` naming the file at fault.
    """
    folder = Path(folder)
    digests = check_digests(folder)
    metadata = read_metadata(folder / METADATA)
    for info in metadata.storage_data.values():
        if info.relative_path not in digests:
            raise CheckpointError(f"{folder / METADATA}: points into {info.relative_path!r}, which {MANIFEST} "
                                  f"does not list; the folder is not a complete checkpoint")
    return metadata


# ---- reading -------------------------------------------------------------------------------------

class _SafeReader(FileSystemReader):
    """DCP's file reader, but ``.metadata`` goes through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path) / METADATA)
        metadata.storage_meta = dcp_metadata.StorageMeta(load_id=self.load_id)
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner (which flattens nested dicts), but plain values are unpickled with
    ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refused {fqn}: it asks to import what a checkpoint must not hold ({e})") \
                from None
        set_path(self.original_state_dict, self.mappings[fqn], obj)


def load_into(folder: Path, state: dict[str, Any], group: Any = None) -> None:
    """Fill ``state`` in place from a verified folder: its tensors (or DTensors, each rank reading only
    its own shards) are copied into, its plain values replaced. A collective over ``group`` (None: this
    process alone). Every key of ``state`` must be in the folder."""
    _load(folder, state, group)


def _load(folder: Path, state: dict[str, Any], group: Any) -> None:
    try:
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafePlanner(),
                 process_group=group, no_dist=group is None)
    except (Exception, dcp.api.CheckpointException) as e:
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        if isinstance(cause, CheckpointError):
            raise CheckpointError(f"{folder}: {cause}") from None
        raise CheckpointError(f"{folder}: could not read it ({type(cause).__name__}: {str(cause)[:200]})") \
            from None


def stored_keys(folder: Path) -> set[str]:
    """The flattened names of everything the folder holds (``model.wte.weight``, ...)."""
    return set(read_metadata(Path(folder) / METADATA).state_dict_metadata)


def read_folder(folder: Path, placeholders_under: Sequence[str] = ()) -> dict[str, Any]:
    """Everything a verified folder holds, as the nested dict that was saved, in this process alone.

    Tensors come back whole and on the CPU, however many ranks wrote them, except those under the
    top-level keys ``placeholders_under``: they are not read, and come back as meta tensors of their
    full shape and dtype (enough to check shapes against a config without reading the weights).
    """
    metadata = read_metadata(Path(folder) / METADATA)
    to_read: dict[str, Any] = {}
    placeholders: dict[str, torch.Tensor] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, dcp_metadata.TensorStorageMetadata):
            target = placeholders if metadata.planner_data[fqn][0] in placeholders_under else to_read
            target[fqn] = torch.empty(item.size, dtype=item.properties.dtype,
                                      device="meta" if target is placeholders else "cpu")
        else:
            to_read[fqn] = None  # a plain value: replaced by what the folder holds
    _load(folder, to_read, None)  # flat keys: each one its own path
    nested: dict[str, Any] = {}
    for fqn, value in {**to_read, **placeholders}.items():
        set_path(nested, metadata.planner_data[fqn], value)
    return nested


def set_path(root: dict[str, Any], path: Sequence[Any], value: Any) -> None:
    """``root[path[0]][path[1]]... = value``, creating dicts (or lists, for int keys) on the way."""
    node: Any = root
    for key, next_key in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
        empty: Any = [] if isinstance(next_key, int) else {}
        if isinstance(node, list):
            if node[key] is None:
                node[key] = empty
        else:
            node.setdefault(key, empty)
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value
