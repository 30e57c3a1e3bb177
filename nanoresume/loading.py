"""Reading a checkpoint safely and completely, and a ready-to-run GPT from either kind of file.

Two kinds exist, described in :mod:`nanoresume.schema`: ``"train"`` (the full
training state) and ``"weights"`` (model tensors plus the model config). Training,
sampling, evaluation and the checkpoint tool all read files through here, so they
agree on what a valid file is: :func:`nanoresume.checkpoint.load_checkpoint`
(checksum, then ``weights_only=True``), the schema with its types, then the
model tensors against the config.

A checkpoint folder (written by every rank, see :mod:`nanoresume.checkpoint.sharded`) is
verified file by file, read whole in this process however many ranks wrote it, and put in
the layout of a file (:func:`file_layout`), so that the same checks and tools apply to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from . import schema
from .checkpoint import is_checkpoint_folder, load_checkpoint
from .checkpoint.folders import MANIFEST
from .config import ModelConfig
from .errors import CheckpointError
from .model import GPT, shapes_only
from .optim import build_optimizer, indexed_optimizer_state, parameter_names
from .parallel import tie_shared
from .training_state import CONFIG, KIND, KIND_KEY, MODEL, OPTIMIZER, RANKS, from_folder

_MIN_TENSORS_PER_BLOCK = 6  # ln_1, qkv, proj, ln_2, fc, mlp proj weights, even without biases


def check_schema(path: Path, state: dict[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` naming what is missing or of the wrong type."""
    found = schema.problems(state)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise CheckpointError(f"{path}: {'; '.join(found[:3])}{more}")


def model_config_from_state(path: Path, state: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a schema-checked checkpoint of either kind, with dropout 0 (inference)."""
    saved = state[CONFIG] if state[KIND_KEY] == KIND else state[schema.MODEL_CONFIG]
    cfg = ModelConfig(**{name: saved[name] for name in schema.SHAPE_FIELDS}, dropout=0.0)
    if min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) < 1 or cfg.n_embd % cfg.n_head:
        raise CheckpointError(f"{path}: model config is invalid (n_layer {cfg.n_layer}, n_head {cfg.n_head}, "
                              f"n_embd {cfg.n_embd}, block_size {cfg.block_size}, vocab_size {cfg.vocab_size})")
    return cfg


def check_model_tensors(path: Path, state: dict[str, Any]) -> ModelConfig:
    """The file's model tensors must be exactly those of a GPT built from its config (names and shapes),
    and a training state's optimizer must hold the groups and moment shapes of that GPT's optimizer.

    Builds the GPT on the meta device (:func:`~nanoresume.model.shapes_only`), so no memory is allocated.
    """
    cfg = model_config_from_state(path, state)
    found = {name: t.shape for name, t in state[MODEL].items()}
    if _MIN_TENSORS_PER_BLOCK * cfg.n_layer > len(found):  # say so before building a huge model
        raise CheckpointError(f"{path}: model tensors do not match its config: n_layer {cfg.n_layer} needs at "
                              f"least {_MIN_TENSORS_PER_BLOCK * cfg.n_layer} tensors, the file holds {len(found)}")
    model = shapes_only(cfg)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
    problems = ([f"missing tensors {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected tensors {', '.join(unexpected[:3])}"] if unexpected else []) + \
               [f"{n} has shape {tuple(found[n])}, config needs {tuple(expected[n])}" for n in wrong[:3]]
    if problems:
        raise CheckpointError(f"{path}: model tensors do not match its config: {'; '.join(problems)}")
    if state[KIND_KEY] == KIND:
        problem = _optimizer_mismatch(model, state[OPTIMIZER])
        if problem is not None:
            raise CheckpointError(f"{path}: optimizer state does not match the model: {problem}")
    return cfg


def _optimizer_mismatch(model: GPT, saved: dict[str, Any]) -> Optional[str]:
    """What keeps ``optimizer.load_state_dict(saved)`` and the next step from working, if anything.

    Saved parameter ids count through the groups in order, as ``Optimizer.state_dict`` numbers them.
    """
    groups = build_optimizer(model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.99)).param_groups
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        return f"its groups hold {saved_sizes} parameters, the model's optimizer {sizes}"
    shapes = dict(zip((i for g in saved["param_groups"] for i in g["params"]),
                      (p.shape for g in groups for p in g["params"])))
    for index, entry in saved["state"].items():
        if index not in shapes:
            return f"state for parameter {index!r}, which no group holds"
        wrong = [name for name, t in entry.items() if t.dim() > 0 and t.shape != shapes[index]]
        if wrong:
            return f"{', '.join(wrong)} of parameter {index} has shape {tuple(entry[wrong[0]].shape)}, " \
                   f"the parameter {tuple(shapes[index])}"
    return None


def read_state(path: Path, tensors: bool = True) -> dict[str, Any]:
    """Load a checkpoint file or folder (checksums + safe unpickling) and check its schema; raises
    CheckpointError. ``tensors=False`` spares reading a folder's model and optimizer tensors: they
    come back as meta tensors of the right shapes (a file is read whole either way)."""
    path = Path(path)
    if path.is_dir() and not is_checkpoint_folder(path):
        raise CheckpointError(f"{path} is a folder, but no checkpoint folder (it holds no {MANIFEST}); pass a "
                              f"checkpoint such as OUT/best.pt, OUT/checkpoints/step_00000500.pt or a "
                              f"step_00000500 folder")
    state = read_folder_state(path, tensors) if path.is_dir() else load_checkpoint(path)
    check_schema(path, state)
    return state


def load_valid(path: Path, tensors: bool = True) -> dict[str, Any]:
    """:func:`read_state`, and the model tensors must match the config; raises CheckpointError."""
    state = read_state(path, tensors)
    check_model_tensors(Path(path), state)
    return state


def read_folder_state(path: Path, tensors: bool = True) -> dict[str, Any]:
    """A verified checkpoint folder's state in the file layout (see :func:`read_state`)."""
    from .checkpoint import sharded  # here, not at the top: it imports torch.distributed.checkpoint

    sharded.verify_folder(path)
    return file_layout(path, sharded.read_folder(path, placeholders_under=() if tensors else (MODEL, OPTIMIZER)))


def file_layout(path: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """A folder's state as a file holds it: the parts stored whole unwrapped (:func:`training_state.from_folder`),
    the optimizer's parameters numbered rather than named, ``ranks`` a list rather than a dict keyed by
    rank, tied weights one tensor, and the optimizer state DCP does not store before the first step
    (an empty dict) put back. What cannot be converted is left for the schema check to name."""
    state = from_folder(saved)
    ranks = state.get(RANKS)
    if isinstance(ranks, dict) and all(str(key).isdigit() for key in ranks):
        state[RANKS] = [ranks[key] for key in sorted(ranks, key=int)]
    config, optimizer = state.get(CONFIG), state.get(OPTIMIZER)
    if not (isinstance(config, dict) and isinstance(optimizer, dict)
            and all(isinstance(config.get(name), bool if name == "bias" else int) for name in schema.SHAPE_FIELDS)):
        return state
    model = shapes_only(model_config_from_state(path, {KIND_KEY: KIND, CONFIG: config}))
    names = parameter_names(model, build_optimizer(model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.99)))
    try:
        state[OPTIMIZER] = indexed_optimizer_state({"state": {}, **optimizer}, names)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not match the model: {e}") from None
    if isinstance(state.get(MODEL), dict):
        state[MODEL] = tie_shared(dict(state[MODEL]), model)
    return state


def load_model(path: Path, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """A GPT in eval mode on ``device`` from a checkpoint of either kind, and the loaded state."""
    state = load_valid(path)
    model = GPT(model_config_from_state(Path(path), state))
    model.load_state_dict(state[MODEL])
    return model.to(device).eval(), state
