"""Start-up of a training run: what to train and from where, decided before anything is built.

``open_run_dir`` locks OUT, ``find_resume`` looks in it (rank 0 reads, every rank gets the
answer), and :func:`plan_start` turns what was found and what was asked into a
:class:`StartPlan`: which config to train, which changes to log, and whether to resume, to
train again the run a config.json describes, or to start fresh. :func:`choose_parallelism`
and :func:`load_data` finish the start-up. Only :func:`plan_start` and
:func:`choose_parallelism` decide anything, and they are pure: unit-test them with plain values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import checkpoint, distributed
from .config import MUST_MATCH_ON_RESUME, TrainConfig, merge_resumed_config, validate
from .data import check_block_size, load_tokens
from .distributed import DistributedEnv
from .errors import CheckpointError, ConfigError
from .loading import load_valid
from .rundir import RunDir
from .training_state import CONFIG, WORLD_SIZE, require_train_state

Warn = Callable[[str], None]


class StartMode(enum.Enum):
    RESUME = "resume"  # continue from a checkpoint
    RERUN = "rerun"  # a run killed before its first checkpoint: train its config.json again from step 0
    FRESH = "fresh"  # a new run


@dataclass(frozen=True)
class Found:
    """What rank 0 found in OUT: the checkpoint to resume from (path, state), or else the config.json
    of a run killed before its first checkpoint (read only with ``--resume auto``)."""

    checkpoint: Optional[tuple[Path, dict[str, Any]]] = None
    unsaved_config: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class StartPlan:
    """The config to train, how this start begins, and the config changes to log (one line each)."""

    cfg: TrainConfig
    mode: StartMode
    changes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Parallelism:
    """How the model is spread over the ranks, and how its checkpoints are stored."""

    sharded_model: bool  # FSDP2: each rank holds a shard of the model and optimizer
    folder_checkpoints: bool  # every rank writes its part of a checkpoint folder
    warning: Optional[str] = None  # a flag that has no effect here


def plan_start(checkpoint_state: Optional[dict[str, Any]], unsaved_config: Optional[dict[str, Any]],
               asked: TrainConfig, explicit: Optional[set[str]], world_size: int,
               unsaved_source: str = "config.json") -> StartPlan:
    """The plan for a start, from the state of the checkpoint found (or None), the config.json of a run
    that never saved (or None) and the config asked for now.

    ``explicit`` names the flags typed now (None: every field counts as given, as in library use).
    A checkpoint wins over a config.json. Raises CheckpointError when the flags contradict what was
    found (the model's shape, the data), ConfigError when the merged config is invalid.
    """
    if checkpoint_state is not None:
        cfg, changes = merge_resumed_config(checkpoint_state[CONFIG], asked, explicit,
                                            int(checkpoint_state.get(WORLD_SIZE, 1)), world_size)
        mode = StartMode.RESUME
    elif unsaved_config is not None:
        # Train the run config.json describes again, from step 0, with the flags given now applied
        # and checked as on a resume.
        cfg, changes = merge_resumed_config(unsaved_config, asked, explicit, int(unsaved_config.get("world_size", 1)),
                                            world_size, source=unsaved_source,
                                            must_match=(*MUST_MATCH_ON_RESUME, "data", "token_dtype"))
        mode = StartMode.RERUN
    else:
        cfg, changes, mode = asked, [], StartMode.FRESH
    problems = validate(cfg)  # the CLI defers this when resuming: flags only make sense merged
    if problems:
        raise ConfigError("; ".join(problems))
    return StartPlan(cfg, mode, tuple(changes))


def choose_parallelism(cfg: TrainConfig, launched: bool, dtype: torch.dtype) -> Parallelism:
    """FSDP or not, files or folders; raises ConfigError for float16 with FSDP (the scaler cannot see
    a sharded model's overflows)."""
    sharded = cfg.parallel == "fsdp" and launched
    warning = None
    if cfg.parallel == "fsdp" and not launched:
        warning = ("--parallel fsdp: a single process has nothing to share the model with, so it trains the "
                   "whole model (launch with torchrun to shard it)")
    if sharded and dtype == torch.float16:
        raise ConfigError("--dtype float16 with --parallel fsdp: the gradient scaler cannot see a sharded "
                          "model's overflows; use --dtype bfloat16 or float32")
    folders = cfg.ckpt_format == "sharded" or (cfg.ckpt_format == "auto" and sharded)
    return Parallelism(sharded, folders, warning)


def open_run_dir(cfg: TrainConfig, env: DistributedEnv, run_dir: RunDir, warn: Warn) -> None:
    """Rank 0 alone creates, checks and locks OUT; a failure there stops every rank."""
    error = None
    if env.is_main:
        try:
            check_resume_path_exists(cfg)  # before OUT is created
            run_dir.open(warn)
        except Exception as e:
            error = e
    distributed.raise_if_any_failed(error)


def find_resume(cfg: TrainConfig, env: DistributedEnv, run_dir: RunDir, warn: Warn) -> Found:
    """What to start from, as rank 0 sees it, on every rank.

    Rank 0 picks and loads the checkpoint (without a folder's tensors) and hands it to every rank,
    so ranks that see a shared folder differently (stale caches) cannot disagree, and the others
    never need to read OUT at all. With ``--resume auto`` and no checkpoint, rank 0 reads
    ``OUT/config.json``.
    """
    found, error = Found(), None
    if env.is_main:
        try:
            resumed = checkpoint.resolve_resume(cfg.resume, checkpoint.CheckpointDir(run_dir.checkpoints), warn,
                                                accept=require_train_state, advice=run_dir.checkpoint_advice,
                                                load=lambda path: load_valid(path, tensors=False))
            unsaved = run_dir.read_config() if resumed is None and cfg.resume == "auto" else None
            found = Found(resumed, unsaved)
        except Exception as e:
            error = e
    distributed.raise_if_any_failed(error)
    return distributed.broadcast_object(found)


def load_data(cfg: TrainConfig, env: DistributedEnv, warn: Warn) -> Any:
    """The token data on every rank: rank 0 tokenizes (and fills the cache) first, the others then
    read the cache."""
    data, error = None, None
    for turn in ("main", "others"):
        if (turn == "main") == env.is_main:
            try:
                data = load_tokens(cfg.data, cfg.val_fraction, cfg.cache_dir, cfg.token_dtype, cfg.vocab_size,
                                   warn=warn)
                check_block_size(data, cfg.block_size)
            except Exception as e:
                error = e
        distributed.raise_if_any_failed(error if (turn == "main") == env.is_main else None)
    return data


def check_resume_path_exists(cfg: TrainConfig) -> None:
    """An explicit ``--resume PATH`` that does not exist fails before OUT is created."""
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).expanduser().exists():
        raise CheckpointError(f"--resume {cfg.resume}: no such checkpoint file or folder; pass an existing "
                              f"OUT/checkpoints/step_* checkpoint, or --resume auto")
