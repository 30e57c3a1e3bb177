"""Start-up of a training run: what to train and from where, decided before anything is built.

``open_mirror`` probes ``--mirror`` (before OUT is touched), ``open_run_dir`` locks OUT,
``find_resume`` looks in it and, with ``--resume auto``, on the mirror (rank 0 reads, every rank gets the
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
from .config import MUST_MATCH_ON_RESUME, TrainConfig, merge_resumed_config, mirror_problems, validate
from .data import check_block_size, load_tokens
from .distributed import DistributedEnv
from .errors import CheckpointError, ConfigError, NanoresumeError
from .loading import load_valid
from .mirror import Mirror, MirrorError, describe_failure, find_newest_on_mirror, parse_options, restore_run_files
from .rundir import RunDir
from .training_state import CONFIG, STEP, WORLD_SIZE, require_train_state

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
    source: Optional[str] = None  # where the checkpoint came from when it was downloaded from --mirror
    mirror_step: Optional[int] = None  # the step the mirror's pointer names, if it can be read


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


def find_resume(cfg: TrainConfig, env: DistributedEnv, run_dir: RunDir, warn: Warn,
                mirror: Optional[Mirror] = None, accept: Optional[Callable[[dict[str, Any]], Any]] = None) -> Found:
    """What to start from, as rank 0 sees it, on every rank.

    Rank 0 picks and loads the checkpoint (without a folder's tensors) and hands it to every rank,
    so ranks that see a shared folder differently (stale caches) cannot disagree, and the others
    never need to read OUT at all. With ``--resume auto`` and no checkpoint, rank 0 reads
    ``OUT/config.json``. With ``--resume auto`` and a ``mirror`` (rank 0's, from :func:`open_mirror`)
    that holds a newer checkpoint that verifies, rank 0 first downloads it into OUT with the run's
    other files (:func:`fetch_from_mirror`); ``accept(state)`` (for example :func:`plan_start` with the
    flags given) raises CheckpointError or ConfigError for a checkpoint this start cannot continue, which
    is refused before anything of it is committed into OUT.
    """
    found, error = Found(), None
    if env.is_main:
        try:
            found = _find_resume(cfg, run_dir, warn, mirror, accept)
        except Exception as e:
            error = e
    distributed.raise_if_any_failed(error)
    return distributed.broadcast_object(found)


def _find_resume(cfg: TrainConfig, run_dir: RunDir, warn: Warn, mirror: Optional[Mirror],
                 accept: Optional[Callable[[dict[str, Any]], Any]]) -> Found:
    def load(path: Path) -> dict[str, Any]:
        return load_valid(path, tensors=False)

    try:
        resumed = checkpoint.resolve_resume(cfg.resume, checkpoint.CheckpointDir(run_dir.checkpoints), warn,
                                            accept=require_train_state, advice=run_dir.checkpoint_advice,
                                            load=load)
        local_error = None
    except CheckpointError as e:  # OUT holds checkpoints and none verifies: the mirror may hold one that does
        if mirror is None or cfg.resume != "auto":
            raise
        resumed, local_error = None, e
    source, mirror_step = None, None
    if mirror is not None:
        mirror_step = _pointer_step(mirror)
    if mirror is not None and cfg.resume == "auto":
        local_step = int(resumed[1][STEP]) if resumed is not None else None
        try:
            fetched = fetch_from_mirror(mirror, run_dir, local_step, warn, load, accept)
        except NanoresumeError:
            raise
        except Exception as e:  # the store's own errors (network, credentials): one line
            raise MirrorError(describe_failure(mirror.url, e)) from None
        if fetched is not None:
            resumed, source = fetched[:2], fetched[2]
    if resumed is None and local_error is not None:
        raise local_error
    unsaved = run_dir.read_config() if resumed is None and cfg.resume == "auto" else None
    return Found(resumed, unsaved, source, mirror_step)


def fetch_from_mirror(mirror: Mirror, run_dir: RunDir, newer_than: Optional[int], warn: Warn,
                      load: Callable[[Path], dict[str, Any]], accept: Optional[Callable[[dict[str, Any]], Any]] = None
                      ) -> Optional[tuple[Path, dict[str, Any], str]]:
    """Download the mirror's newest checkpoint that verifies, if it is newer than ``newer_than`` (the
    newest local step that verifies), into OUT (temp name, verify, commit), and restore the run's other
    files (config.json, metrics.jsonl cut at its step, TensorBoard, best.pt). Returns (path, state,
    where it came from), or None. A checkpoint that ``accept(state)`` refuses (the flags given contradict
    it) is a MirrorError, raised before it is committed."""
    states: dict[str, dict[str, Any]] = {}

    def check(path: Path) -> None:  # the same load a local checkpoint gets; kept so it is read once
        states["state"] = require_train_state(path, load(path))
        if accept is not None:
            try:
                accept(states["state"])
            except (CheckpointError, ConfigError) as e:  # not skipped, as a damaged one is: this is another run
                raise MirrorError(f"{e} (--mirror {mirror.url} holds that checkpoint; nothing was copied into "
                                  f"{run_dir.root})") from None

    restored = find_newest_on_mirror(mirror, run_dir.checkpoints, warn, newer_than=newer_than, check=check)
    if restored is None:
        return None
    restore_run_files(mirror, run_dir.root, restored.step, warn)
    return restored.path, states["state"], restored.source


def _pointer_step(mirror: Mirror) -> Optional[int]:
    try:
        pointer = mirror.pointer()
    except (ValueError, KeyError):
        return None  # unreadable: find_newest_on_mirror says so
    except OSError as e:
        raise MirrorError(describe_failure(mirror.url, e)) from None
    return pointer.step if pointer is not None else None


def open_mirror(cfg: TrainConfig, env: DistributedEnv) -> Optional[Mirror]:
    """Rank 0 opens ``--mirror`` and proves it can write there (a small object written and deleted),
    before OUT is created; a mirror that cannot work stops every rank with one line (MirrorError,
    exit 2). With ``--resume none`` a mirror that already holds checkpoints is refused, as OUT is.
    Returns the mirror on rank 0, None elsewhere and without ``--mirror``."""
    if cfg.mirror is None:
        return None
    mirror, error = None, None
    if env.is_main:
        try:
            problems = mirror_problems(cfg)
            if problems:
                raise ConfigError("; ".join(problems))
            mirror = Mirror(cfg.mirror, parse_options(cfg.mirror_option or []))
            mirror.probe()
            if cfg.resume == "none":
                held = _pointer_step(mirror)
                if held is not None or mirror.checkpoints():
                    what = f"step {held}" if held is not None else "unfinished uploads"
                    raise MirrorError(f"--mirror {mirror.url} already holds checkpoints of a run ({what}); continue "
                                      f"it with --resume auto, or choose another --mirror for a new run")
        except Exception as e:
            error = e
    distributed.raise_if_any_failed(error)
    return mirror


def claim_mirror(mirror: Optional[Mirror], cfg: TrainConfig, fingerprint: str, env: DistributedEnv) -> None:
    """Refuse a mirror that holds another run (other data, or a model of another shape): its checkpoints
    would mix with this run's. The first run to use a mirror records what it trains there. Collective."""
    error = None
    if mirror is not None and env.is_main:
        try:
            mirror.claim(run_identity(cfg, fingerprint))
        except Exception as e:
            error = e
    distributed.raise_if_any_failed(error)


def run_identity(cfg: TrainConfig, fingerprint: str) -> dict[str, Any]:
    """What makes two runs the same run, for a mirror: the data and the fields a resume must match."""
    return {"data_fingerprint": fingerprint, **{name: getattr(cfg, name) for name in MUST_MATCH_ON_RESUME}}


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
