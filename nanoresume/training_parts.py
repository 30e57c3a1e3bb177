"""The trainer's live stateful parts, saved and restored together by name.

:class:`TrainingParts` holds what a restart must restore (model, optimizer, schedule, gradient
scaler, batch sampler, counters, each rank's random streams) and turns it into a training state
(:mod:`nanoresume.training_state` names its keys) and back: in the layout of a file (one writer,
gathered) or as this rank's part of a checkpoint folder (every rank writes its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed, messages, parallel
from .config import TrainConfig
from .distributed import DistributedEnv
from .errors import CheckpointError, NonFiniteLossError
from .optim import apply_hyperparameters
from .state import capture_rng_state, restore_rng_state, seed_rank_streams
from .training_state import (DATA, FINGERPRINT, MODEL, OPTIMIZER, RANKS, RNG, SAMPLER, SCALER, SCHEDULER, SOURCE,
                             Counters, Stateful, build, for_folder, rank_entry)


class NonFiniteWeightsError(NonFiniteLossError):
    """A parameter holds NaN/inf, so the weights are not saved. A NonFiniteLossError for callers that
    already catch that one (a NaN loss comes first as a rule; weights can go bad without one)."""


class TrainingParts:
    """The parts of one rank's training, by name. ``sharded``: the model and optimizer are FSDP2 shards.

    ``warn`` receives what a resume cannot restore exactly (a new gradient scaler, new random streams).
    """

    def __init__(self, cfg: TrainConfig, env: DistributedEnv, data: Any, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, sampler: Stateful,
                 sharded: bool, warn: Callable[[str], None]) -> None:
        self.cfg, self.env, self.data, self.warn = cfg, env, data, warn
        self.model, self.optimizer, self.sharded = model, optimizer, sharded
        self.scheduler, self.scaler, self.sampler = scheduler, scaler, sampler
        self.counters = Counters()

    def named(self) -> dict[str, Stateful]:
        """The parts besides the model and optimizer, each with its own ``state_dict()``."""
        return {SCHEDULER: self.scheduler, SCALER: self.scaler, SAMPLER: self.sampler}

    def state_dict(self) -> dict[str, Any]:
        """The full training state in the file layout: rank 0 gets every rank's RNG streams, and under
        FSDP the whole model and optimizer on its CPU (a collective under torchrun).

        Holds references to live tensors: save or copy it before the next step.
        """
        ranks = distributed.gather_objects(rank_entry(self.env.rank, capture_rng_state()))
        model, optimizer = parallel.file_state(self.model, self.optimizer, self.sharded)
        return self._state(model, optimizer, ranks)

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's part of a checkpoint folder (see :mod:`nanoresume.parallel`): its shards of the
        model and optimizer, its own RNG streams, and what every rank holds alike. Gathers nothing."""
        model, optimizer = parallel.sharded_state(self.model, self.optimizer)
        # A key per rank: DCP keeps one copy of a key that every rank saves.
        return for_folder(self._state(model, optimizer, {str(self.env.rank): rank_entry(self.env.rank,
                                                                                         capture_rng_state())}))

    def _state(self, model: dict[str, Any], optimizer: dict[str, Any], ranks: Any) -> dict[str, Any]:
        # The sampler is the same on every rank: batches depend on the step only.
        return build(self.counters, self.cfg.to_dict(), {FINGERPRINT: self.data.fingerprint, SOURCE: self.data.source},
                     self.env.world_size, model, optimizer, self.named(), ranks)

    def checkpoint(self, folder: bool) -> dict[str, Any]:
        """This step's checkpoint: :meth:`sharded_state_dict` for a ``folder``, else :meth:`state_dict`.
        Raises NonFiniteWeightsError, on every rank, rather than save NaN/inf weights."""
        bad = next((name for name, p in self.model.named_parameters() if not torch.isfinite(parallel.local(p)).all()),
                   None)
        error = None if bad is None else NonFiniteWeightsError(messages.nonfinite_weights(bad, self.counters.step))
        if self.sharded:
            distributed.raise_if_any_failed(error)  # each rank sees only its shards
        elif error is not None:
            raise error
        return self.sharded_state_dict() if folder else self.state_dict()

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Resume from the checkpoint at ``path``: a file's ``state`` holds everything; a folder's holds
        no model or optimizer tensors, and every rank reads the shards it needs from ``path``."""
        saved = state[DATA][FINGERPRINT]
        if saved != self.data.fingerprint:
            raise CheckpointError(messages.other_data(path, saved, self.data.fingerprint, self.data.source))
        if path.is_dir():
            parallel.load_folder(path, self.model, self.optimizer, distributed.default_group())
            self._load_the_rest(state)
        else:
            self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state in the file layout (every rank passes all of it; under FSDP each keeps its shards)."""
        parallel.load_file_state(self.model, self.optimizer, state[MODEL], state[OPTIMIZER], self.sharded)
        self._load_the_rest(state)

    def _load_the_rest(self, state: dict[str, Any]) -> None:
        """Everything but the model and the optimizer's tensors."""
        cfg = self.cfg
        self.scheduler.load_state_dict(state[SCHEDULER])
        if self.scaler.is_enabled() and not state[SCALER]:
            self.warn(messages.new_scaler())
        else:
            self.scaler.load_state_dict(state[SCALER])
        self.counters.load_state_dict(state)
        apply_hyperparameters(self.optimizer, self.scheduler, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.sampler.load_state_dict(state[SAMPLER])
        ranks = state[RANKS]
        if len(ranks) == self.env.world_size:
            for warning in restore_rng_state(ranks[self.env.rank][RNG]):
                self.warn(warning)
        else:
            seed_rank_streams(cfg.seed, self.env.rank, self.counters.step)
            self.warn(messages.new_rank_streams(len(ranks), self.env.world_size))
