"""A copy of a training state in CPU memory, taken on the training thread so a background
write can never see a tensor change under it.

The copy keeps the state's shape exactly: a tensor met twice is one tensor in the copy,
and tensors that share storage (tied embeddings, views) share storage in the copy too,
so ``torch.save`` writes the same bytes it would have written from the live state.
Buffers are kept between snapshots and reused when the next state has the same storages
(every checkpoint of a run does), which spares the allocation and page faults of fresh
memory; on CUDA they are pinned, so the device-to-host copies run asynchronously and
finish with one synchronize. A DTensor (one rank's shard of a sharded model) is copied as its
local shard, on the CPU, wrapped again with the same mesh and placements.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch


class Snapshotter:
    """``take(state)`` returns a deep copy of ``state`` whose tensors live in reusable CPU buffers.

    Not thread-safe by itself: call :meth:`take` only once the previous snapshot is no longer
    being written (the checkpoint writer waits for its in-flight save first).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.UntypedStorage] = {}

    def take(self, state: Any) -> Any:
        copies: dict[tuple[Any, ...], torch.UntypedStorage] = {}  # source storage -> its copy, in this call
        tensors: dict[int, torch.Tensor] = {}  # id of a source tensor -> its copy: a tensor met twice stays one
        buffers: dict[tuple[Any, ...], torch.UntypedStorage] = {}
        needs_sync = False

        def copy_storage(source: torch.UntypedStorage, key: tuple[Any, ...]) -> torch.UntypedStorage:
            nonlocal needs_sync
            if key in copies:
                return copies[key]
            nbytes = source.nbytes()
            buffer = self._buffers.get(key)
            if buffer is None or buffer.nbytes() != nbytes:
                pinned = source.device.type == "cuda"
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            if nbytes:
                buffer.copy_(source, non_blocking=source.device.type == "cuda")
                needs_sync |= source.device.type == "cuda"
            copies[key] = buffers[key] = buffer
            return buffer

        dtensor = _dtensor_type()

        def visit(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if id(value) not in tensors:
                    if dtensor is not None and isinstance(value, dtensor):
                        # Its CPU copy under the same spec, as DCP's own staging does: from_local would
                        # move the copy back to the mesh's device (a GPU), where FSDP has no room for it.
                        local = _copy_tensor(value.to_local().detach(), copy_storage)
                        tensors[id(value)] = dtensor(local, value._spec, requires_grad=False)
                    else:
                        tensors[id(value)] = _copy_tensor(value.detach(), copy_storage)
                return tensors[id(value)]
            if isinstance(value, dict):
                return type(value)((k, visit(v)) for k, v in value.items())
            if isinstance(value, list):
                return [visit(v) for v in value]
            if isinstance(value, tuple):
                return tuple(visit(v) for v in value)
            return copy.deepcopy(value)

        result = visit(state)
        if needs_sync:
            torch.cuda.synchronize()
        self._buffers = buffers  # storages the state no longer has are let go
        return result


def _dtensor_type() -> Optional[type]:
    """torch's DTensor class if it is in use: none can exist before its module is imported, and
    importing it here would slow every process down for nothing."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _copy_tensor(tensor: torch.Tensor, copy_storage: Any) -> torch.Tensor:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        return tensor.to("cpu", copy=True)  # rare layouts: a plain copy (sharing is not preserved)
    source = tensor.untyped_storage()
    key = (source.device.type, source.device.index, source.data_ptr(), source.nbytes())
    storage = copy_storage(source, key)
    copied = torch.empty(0, dtype=tensor.dtype)
    copied.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    return copied
