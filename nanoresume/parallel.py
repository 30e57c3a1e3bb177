"""How torchrun's processes share the model (DDP or FSDP2), and the model and optimizer state in
the two layouts checkpoints use.

- **file layout** (``torch.save`` files): the model's ``state_dict()`` and the optimizer's, its
  parameters numbered as ``Optimizer.state_dict`` numbers them. Under FSDP both are gathered
  whole to rank 0's CPU: only for models that fit there.
- **sharded layout** (checkpoint folders): ``torch.distributed.checkpoint.state_dict``'s, each rank
  holding its own shards (DTensors under FSDP) and the optimizer keyed by parameter name, so that
  any number of ranks, sharded or not, can read it back. Nothing is gathered on one rank.

FSDP and torch.distributed.checkpoint are imported inside the functions that use them: together
they cost more than half a second, and a single process or a DDP run writing files never needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import distributed
from .errors import CheckpointError
from .optim import indexed_optimizer_state, named_optimizer_state, parameter_names
from .training_state import MODEL, OPTIMIZER


def shard(model: nn.Module, blocks: nn.ModuleList, device: torch.device, world_size: int,
          dtype: torch.dtype) -> None:
    """FSDP2, in place: every block is its own unit (gathered for its forward and backward only), the
    root holds the rest (embeddings, final norm). A ``dtype`` other than float32 computes in that
    dtype through FSDP2's policy, with float32 weights, optimizer state and gradient reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cpu":
        return_freed_memory()
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy() if dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give every freed block of ``threshold`` bytes or more back to the system at once;
    False where that cannot be set (not glibc). Process-wide, and set once.

    FSDP gathers each unit's weights (and gradients) whole, uses them, and frees them. glibc's default
    raises its mmap threshold to the largest block freed so far, so from the second unit on these
    blocks come from its heap, and freed ones stay in the process: on the CPU, a 32-block model kept
    about two units' worth per block, and a rank's peak RSS ended above DDP's. With the threshold fixed
    they are unmapped when freed and the peak is the shard plus about one unit (benchmarks/fsdp_memory.py).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A value every rank holds whole (a gradient norm under FSDP is a replicated DTensor), as a tensor."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


# ---- file layout ---------------------------------------------------------------------------------

def file_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model state, optimizer state) in the file layout. A collective under FSDP (``sharded``),
    after which rank 0 holds both whole on its CPU and the other ranks hold nothing."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_weights(model, sharded)
    if not optimizer.state:  # nothing to gather, and torch would initialise the state to gather it
        return weights, optimizer.state_dict()
    gathered = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not gathered:  # not rank 0
        return weights, {}
    return weights, indexed_optimizer_state(gathered, parameter_names(model, optimizer))


def load_file_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Any],
                    optimizer_state: dict[str, Any], sharded: bool) -> None:
    """Inverse of :func:`file_state`; every rank passes the whole state, and under FSDP keeps its shards."""
    if not sharded:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    names = parameter_names(model, optimizer)
    named = named_optimizer_state(optimizer_state, names) if optimizer_state["state"] else None
    _set_sharded(model, optimizer, weights, named, full=True)
    if named is None:  # saved before the first step: parameter groups only, no tensors to shard
        optimizer.load_state_dict(optimizer_state)


def full_weights(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` whole (best.pt); under FSDP a collective, gathered to rank 0's
    CPU (the other ranks get an empty dict)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return tie_shared(get_model_state_dict(model, options=options), model)


def tie_shared(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Make the entries of one shared parameter (tied embeddings) one tensor again, as in the model's
    own ``state_dict()``: a gathered or loaded state holds a separate copy under each name."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        if first[id(p)] != name and name in state and first[id(p)] in state:
            state[name] = state[first[id(p)]]
    return state


# ---- sharded layout ------------------------------------------------------------------------------

def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) in the sharded layout: this rank's shards, gathering nothing."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if not optimizer.state:  # before the first step; torch would initialise the state to save it
        return get_model_state_dict(model), named_optimizer_state(optimizer.state_dict(),
                                                                  parameter_names(model, optimizer))
    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)


def load_folder(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> None:
    """Load a verified checkpoint folder written by any number of ranks, sharded or not, into this
    rank's model and optimizer: a collective over ``group`` (None: one process), each rank reading
    only the chunks its shards need."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from .checkpoint.sharded import load_into, stored_keys

    state: dict[str, Any] = {MODEL: get_model_state_dict(model)}
    # A folder saved before the first step holds no optimizer state; a new optimizer is that state.
    if any(key.startswith(f"{OPTIMIZER}.state.") for key in stored_keys(folder)):
        state[OPTIMIZER] = get_optimizer_state_dict(model, optimizer)
    load_into(folder, state, group)
    _set_sharded(model, optimizer, state[MODEL], state.get(OPTIMIZER), full=False)
    problem = None if OPTIMIZER not in state else loaded_optimizer_problem(model, optimizer, state[OPTIMIZER])
    error = CheckpointError(f"{folder}: after loading, {problem}; this torch cannot resume it as saved, "
                            f"resume from another checkpoint") if problem else None
    distributed.raise_if_any_failed(error)  # every rank refuses together, none waits in a collective


def loaded_optimizer_problem(model: nn.Module, optimizer: torch.optim.Optimizer,
                             loaded: dict[str, Any]) -> Optional[str]:
    """What is wrong with the optimizer after a folder was loaded into it, in a few words; None if nothing.

    Every state tensor must be laid out as its parameter is (a DTensor with the same mesh, placements
    and local shape under FSDP, a plain tensor of the same shape otherwise): a DCP load that left a
    moment whole, replicated or misplaced trains on silently wrong numbers (the pytorch #138575 class).
    Every parameter group must hold what the folder held (learning rate, betas, weight decay...)."""
    names = {id(p): name for name, p in model.named_parameters()}
    for p, values in optimizer.state.items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # AdamW's step count: a scalar on every rank
            if _layout(value) != _layout(p):
                return (f"optimizer state {names.get(id(p), '?')}.{key} is laid out as {_layout(value)} but "
                        f"its parameter as {_layout(p)}")
    groups = loaded.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        return f"the optimizer has {len(optimizer.param_groups)} parameter groups but the checkpoint {len(groups)}"
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, groups)):
        if [names.get(id(p)) for p in group["params"]] != list(saved.get("params", [])):
            return f"parameter group {index} holds other parameters than the checkpoint's"
        for key, value in saved.items():
            if key != "params" and _plain(group.get(key)) != _plain(value):
                return f"parameter group {index} has {key} {group.get(key)!r} but the checkpoint {value!r}"
    return None


def _layout(tensor: torch.Tensor) -> str:
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return f"a tensor of shape {tuple(tensor.shape)}"
    return (f"a DTensor {tuple(placements)} on mesh {tuple(tensor.device_mesh.mesh.tolist())} with a local "
            f"shard of {tuple(tensor.to_local().shape)}")


def _plain(value: Any) -> Any:
    """Tuples as lists, tensors as numbers: how a value may come back from a folder."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _set_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Any],
                 optimizer_state: Any, full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=full)
    set_model_state_dict(model, weights, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
