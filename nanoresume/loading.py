"""What a saved checkpoint must hold, and a ready-to-run GPT from either kind of file.

Two kinds exist: ``"train"`` (``OUT/checkpoints/step_*.pt``, the full training
state) and ``"weights"`` (``OUT/best.pt`` or an export: model tensors plus the
model config). Sampling, evaluation and the checkpoint tool all go through
here, so they agree on what a valid file is. Every load uses
:func:`nanoresume.checkpoint.load_checkpoint` (checksum, then ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .model import GPT

# Top-level keys each kind must hold (see Trainer.state_dict and Trainer._evaluate_and_log).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("format_version", "kind", "step", "tokens_seen", "best_val_loss", "evaluated_step", "config", "data",
              "model", "optimizer", "scheduler", "scaler", "sampler", "ranks"),
    "weights": ("format_version", "kind", "model", "model_config", "step", "tokens_seen", "val_loss"),
}
# ModelConfig fields read from a checkpoint; dropout is left out on purpose (inference runs without it).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def check_schema(path: Path, state: dict[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` if a loaded state lacks a key its kind needs."""
    kind = state.get("kind")
    if kind not in REQUIRED_KEYS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}; expected 'train' (a step "
                              f"checkpoint) or 'weights' (best.pt or an export)")
    missing = [key for key in REQUIRED_KEYS[kind] if key not in state]
    if missing:
        raise CheckpointError(f"{path}: {kind} checkpoint lacks {', '.join(missing)}; "
                              f"it was not written by nanoresume or is from an incompatible version")
    if not isinstance(state["model"], dict) or not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        raise CheckpointError(f"{path}: 'model' is not a dict of tensors")


def model_config_from_state(path: Path, state: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint of either kind, with dropout 0 (inference)."""
    saved = state.get("model_config") if state.get("kind") == "weights" else state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: holds no model config")
    missing = [name for name in SHAPE_FIELDS if saved.get(name) is None]
    if missing:
        raise CheckpointError(f"{path}: model config lacks {', '.join(missing)}")
    cfg = ModelConfig(**{name: saved[name] for name in SHAPE_FIELDS}, dropout=0.0)
    if cfg.n_head < 1 or cfg.n_embd % cfg.n_head != 0:
        raise CheckpointError(f"{path}: model config is invalid (n_embd {cfg.n_embd}, n_head {cfg.n_head})")
    return cfg


def check_model_tensors(path: Path, state: dict[str, Any]) -> ModelConfig:
    """The file's model tensors must be exactly those of a GPT built from its config (names and shapes).

    Builds the GPT on the meta device, so no memory is allocated for weights.
    """
    cfg = model_config_from_state(path, state)
    with torch.device("meta"):
        expected = {name: t.shape for name, t in GPT(cfg).state_dict().items()}
    found = {name: t.shape for name, t in state["model"].items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
    problems = ([f"missing tensors {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected tensors {', '.join(unexpected[:3])}"] if unexpected else []) + \
               [f"{n} has shape {tuple(found[n])}, config needs {tuple(expected[n])}" for n in wrong[:3]]
    if problems:
        raise CheckpointError(f"{path}: model tensors do not match its config: {'; '.join(problems)}")
    return cfg


def load_valid(path: Path) -> dict[str, Any]:
    """Load (checksum + safe unpickle) and check the schema and model tensors; raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as OUT/best.pt "
                              f"or OUT/checkpoints/step_00000500.pt")
    state = load_checkpoint(path)
    check_schema(path, state)
    check_model_tensors(path, state)
    return state


def load_model(path: Path, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """A GPT in eval mode on ``device`` from a checkpoint of either kind, and the loaded state."""
    state = load_valid(path)
    model = GPT(model_config_from_state(Path(path), state))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state

