"""A checkpoint folder's ``.metadata`` (DCP's index): read with an unpickler that builds only DCP's
metadata classes, then checked to be well-formed before anything is built from it.

``read_metadata(folder / ".metadata")`` returns DCP's :class:`Metadata` or raises a one-line
:class:`CheckpointError`. The allow-list alone keeps code from running; the check keeps a crafted
index made of allowed classes from crashing or exhausting the reader: every tensor size is a short
tuple of non-negative ints whose bytes the folder's files could hold, every chunk lies inside its
tensor, every byte range inside its file, and the nesting paths (``planner_data``) are non-empty,
distinct, none the start of another, with small list indices, so that rebuilding the nested dict
(:func:`.sharded.set_path`) cannot fail or allocate without bound.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from ..errors import CheckpointError
from .folders import is_plain_name

# What a DCP index may be built from: its own dataclasses, and the torch and pathlib values they hold.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}

MAX_DIMS = 32  # far more than any tensor of a model has; torch itself refuses more than 64


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and nothing else: any other global is refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's index at ``path`` (``<folder>/.metadata``), unpickled with an allow-list and checked
    against the files beside it; a one-line CheckpointError for anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        text = str(e)
        if text.startswith("GLOBAL "):
            raise CheckpointError(f"{path}: refused, it asks to import {text[7:]}, and loading it could run "
                                  f"code; a checkpoint index holds only DCP's metadata") from None
        raise CheckpointError(f"{path}: not a readable checkpoint index ({text[:80]})") from None
    except Exception as e:  # truncated or garbled pickles raise many kinds of errors
        raise CheckpointError(f"{path}: not a readable checkpoint index ({type(e).__name__})") from None
    problem = metadata_problem(metadata, lambda name: _file_size(path.parent / name))
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; the index is damaged or crafted: use an earlier checkpoint")
    return metadata


def _file_size(path: Path) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def metadata_problem(metadata: Any, file_size: Any) -> Optional[str]:
    """What is wrong with an unpickled index, in a few words, or None. ``file_size(name)`` is the
    size of the folder's file ``name`` in bytes, or None if there is none."""
    if not isinstance(metadata, dcp_metadata.Metadata):
        return f"holds an object of type {type(metadata).__name__}, not DCP's metadata"
    entries, storage, paths = metadata.state_dict_metadata, metadata.storage_data, metadata.planner_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "is not a complete DCP index"
    if not isinstance(paths, dict) or set(paths) != set(entries):
        return "does not say how its entries nest (not written by nanoresume)"
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        problem = _storage_problem(index, info, entries, sizes, file_size)
        if problem is not None:
            return problem
    held = sum(sizes.values())
    for fqn, item in entries.items():
        problem = _entry_problem(item, held)
        if problem is not None:
            return f"entry {fqn!r:.80}: {problem}"
    return _paths_problem(paths)


def _storage_problem(index: Any, info: Any, entries: dict[Any, Any], sizes: dict[str, int],
                     file_size: Any) -> Optional[str]:
    """Where one piece is stored: a plain file of the folder, a byte range inside it, no transform."""
    name = getattr(info, "relative_path", "")
    if not isinstance(name, str) or not is_plain_name(name) or getattr(info, "transform_descriptors", None):
        return f"points outside its folder or asks for a storage transform ({info!r:.80})"
    if not isinstance(index, dcp_metadata.MetadataIndex) or index.fqn not in entries:
        return f"stores a piece of no entry ({index!r:.80})"
    if name not in sizes:
        size = file_size(name)
        if size is None:
            return f"points into {name!r}, which the folder does not hold"
        sizes[name] = size
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if not (_is_count(offset) and _is_count(length)):
        return f"stores {index.fqn!r:.80} at a malformed byte range ({offset!r:.40}, {length!r:.40})"
    if offset + length > sizes[name]:
        return f"stores {index.fqn!r:.80} at bytes {offset:,}-{offset + length:,}, beyond the end of {name} " \
               f"({sizes[name]:,} bytes)"
    return None


def _entry_problem(item: Any, held: int) -> Optional[str]:
    """One entry: a plain value, or a tensor whose size is well-formed and fits in ``held`` bytes."""
    if isinstance(item, dcp_metadata.BytesStorageMetadata):
        return None
    if not isinstance(item, dcp_metadata.TensorStorageMetadata):
        return f"is neither a tensor nor a value ({type(item).__name__})"
    dtype = getattr(item.properties, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return f"a tensor without a dtype ({dtype!r:.40})"
    size = item.size
    if not _is_shape(size):
        return f"malformed tensor size {size!r:.80} (at most {MAX_DIMS} non-negative ints)"
    nbytes = math.prod(size) * dtype.itemsize
    if nbytes > held:
        return f"tensor size {list(size)!r:.80} would need {nbytes:,} bytes, more than the folder's files " \
               f"hold ({held:,})"
    if not isinstance(item.chunks, list):
        return "malformed chunk list"
    for chunk in item.chunks:
        offsets, lengths = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (_is_shape(offsets) and _is_shape(lengths) and len(offsets) == len(lengths) == len(size)
                and all(o + n <= s for o, n, s in zip(offsets, lengths, size))):
            return f"chunk {chunk!r:.80} lies outside the tensor of size {list(size)}"
    return None


def _paths_problem(paths: Mapping[str, Any]) -> Optional[str]:
    """The nesting paths rebuild one tree: each non-empty, made of strs and small ints, distinct, none
    the start of another, and the keys under any one node all strs (a dict) or all ints (a list)."""
    leaves: dict[tuple[Any, ...], str] = {}
    key_kinds: dict[tuple[Any, ...], type] = {}
    for fqn, path in paths.items():
        if not isinstance(path, (tuple, list)) or not path:
            return f"entry {fqn!r:.80} has an empty or malformed path {path!r:.80}"
        for key in path:
            if not (isinstance(key, str) or (type(key) is int and 0 <= key < len(paths))):
                return f"entry {fqn!r:.80} has a malformed key {key!r:.40} in its path"
        path = tuple(path)
        if path in leaves:
            return f"entries {leaves[path]!r:.80} and {fqn!r:.80} have the same path"
        leaves[path] = fqn
        for depth, key in enumerate(path):
            kind = int if type(key) is int else str
            if key_kinds.setdefault(path[:depth], kind) is not kind:
                return f"entry {fqn!r:.80} has a path that mixes list and dict keys under one node"
    for path, fqn in leaves.items():
        if path in key_kinds:  # some other path passes through this one
            return f"the path of entry {fqn!r:.80} is the start of another entry's path"
    return None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) <= MAX_DIMS and all(_is_count(n) for n in value)
