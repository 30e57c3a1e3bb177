"""The GPT trainer's checkpoint: its keys, its format version, and the named parts it is made of.

A training state is one flat dict (``OUT/checkpoints/step_*``)::

    format_version, kind             the header: FORMAT_VERSION and "train"
    step, tokens_seen, best_val_loss, evaluated_step      the counters (:class:`Counters`)
    config, data, world_size         the settings it was trained with
    model, optimizer                 the tensors
    scheduler, scaler, sampler       stateful parts, each its own ``state_dict()``
    ranks                            one entry per rank: {"rank": r, "rng": its random streams}

This module is the one place that spells these keys: the trainer builds the dict with
:func:`build`, and :mod:`nanoresume.schema`, :mod:`nanoresume.loading` and the tools read it
through the names below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Protocol

from .checkpoint import FORMAT_VERSION, FORMAT_VERSION_KEY, KIND_KEY
from .errors import CheckpointError

# The header (version and kind) is shared with every other nanoresume file, so the checkpoint
# package owns it. What the version means for a step checkpoint (a resume refuses another version,
# whose data order this one cannot continue exactly): 2: the data position is one sampler for all
# ranks (batches depend on the step only) and ranks hold only their RNG streams; 1: a sampler per
# rank, drawn per micro-batch.
KIND = "train"
HEADER = (FORMAT_VERSION_KEY, KIND_KEY)

# The counters: the fields of Counters, at the top level of the dict.
STEP = "step"
TOKENS_SEEN = "tokens_seen"
BEST_VAL_LOSS = "best_val_loss"
EVALUATED_STEP = "evaluated_step"

# The settings the state was trained with.
CONFIG = "config"
DATA = "data"  # {FINGERPRINT: SHA-256 of the training tokens, SOURCE: where they came from}
WORLD_SIZE = "world_size"
SETTINGS = (CONFIG, DATA, WORLD_SIZE)
FINGERPRINT = "fingerprint"
SOURCE = "source"

# The parts.
MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
SAMPLER = "sampler"
RANKS = "ranks"  # a list in rank order (a folder stores a dict keyed by str(rank))
RANK = "rank"
RNG = "rng"
STATEFUL_PARTS = (SCHEDULER, SCALER, SAMPLER)  # handed to build() by name

# A checkpoint folder (torch.distributed.checkpoint) stores each value of a nested dict as its own entry
# and drops empty dicts, such as a float32 run's scaler state or the scheduler's [{}] for its lambda.
# These parts hold no tensors, so a folder stores each whole, as a 1-tuple, which DCP keeps as one value.
WHOLE_IN_FOLDERS = (CONFIG, DATA, SCHEDULER, SCALER, SAMPLER)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Counters:
    """How far training got: what a resumed run continues from."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # training tokens consumed, summed over ranks
    best_val_loss: float = math.inf
    evaluated_step: int = -1  # last step whose evaluation completed (a stop can cut one short)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Read the counters from a training state (or from :meth:`state_dict`)."""
        self.step = int(state[STEP])
        self.tokens_seen = int(state[TOKENS_SEEN])
        self.best_val_loss = float(state[BEST_VAL_LOSS])
        self.evaluated_step = int(state[EVALUATED_STEP])


COUNTERS = tuple(f.name for f in fields(Counters))
assert COUNTERS == (STEP, TOKENS_SEEN, BEST_VAL_LOSS, EVALUATED_STEP)


def build(counters: Counters, config: dict[str, Any], data: dict[str, str], world_size: int, model: Any,
          optimizer: Any, parts: Mapping[str, Stateful], ranks: Any) -> dict[str, Any]:
    """A training state in the order above. ``parts`` maps each of :data:`STATEFUL_PARTS` to its object;
    ``data`` is ``{FINGERPRINT: ..., SOURCE: ...}``; ``ranks`` holds :func:`rank_entry` values."""
    assert set(parts) == set(STATEFUL_PARTS), sorted(parts)
    return {
        FORMAT_VERSION_KEY: FORMAT_VERSION,
        KIND_KEY: KIND,
        **counters.state_dict(),
        WORLD_SIZE: world_size,
        CONFIG: config,
        DATA: data,
        MODEL: model,
        OPTIMIZER: optimizer,
        **{name: parts[name].state_dict() for name in STATEFUL_PARTS},
        RANKS: ranks,
    }


def rank_entry(rank: int, rng: dict[str, Any]) -> dict[str, Any]:
    """One rank's entry in :data:`RANKS`: its number and its random streams."""
    return {RANK: rank, RNG: rng}


def for_folder(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a checkpoint folder stores it (see :data:`WHOLE_IN_FOLDERS`)."""
    return {key: (value,) if key in WHOLE_IN_FOLDERS else value for key, value in state.items()}


def from_folder(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`for_folder`; a part that is not a 1-tuple is left for the schema check to name."""
    return {key: value[0] if key in WHOLE_IN_FOLDERS and isinstance(value, tuple) and len(value) == 1 else value
            for key, value in state.items()}


def require_train_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` if a run can resume from it, else CheckpointError saying why: the ``accept`` that the
    trainer hands :func:`nanoresume.checkpoint.resolve_resume`."""
    if state.get(KIND_KEY) != KIND:
        raise CheckpointError(f"{path}: holds {state.get(KIND_KEY)!r} weights, not a full training state; "
                              f"resume from a checkpoints/step_*.pt file")
    if state.get(FORMAT_VERSION_KEY) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: a training state of format {state.get(FORMAT_VERSION_KEY)!r}, whose data "
                              f"order this nanoresume (format {FORMAT_VERSION}) cannot continue exactly; finish that "
                              f"run with the version that wrote it (its weights still work with sample, evaluate "
                              f"and ckpt export)")
    return state
