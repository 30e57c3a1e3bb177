"""The training loop: wires config, data, model, optimizer, checkpoints, signals and metrics.

``Trainer(cfg).run()`` trains until ``max_steps`` or a stop request, saving a
checkpoint on the interval, at the end, and whenever it stops. Everything that
must survive a restart goes through :meth:`Trainer.state_dict` /
:meth:`Trainer.load_state_dict`, so a resumed run is bit-for-bit the one that
never stopped.

Under torchrun every rank runs this same loop on its share of each global batch, with the
model replicated (DistributedDataParallel) or sharded (FSDP2, ``--parallel fsdp``, see
:mod:`nanoresume.parallel`); rank 0 alone writes files and logs, every rank writes its part
of a checkpoint folder, and every decision that could differ between ranks is taken
together, once per step (:func:`nanoresume.distributed.agree`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed, parallel, schema
from .config import ARCHITECTURE_FIELDS, TrainConfig, derived_fields, merge_resumed_config, validate
from .console import Console, configure_logging, format_elapsed, log, wants_bar
from .data import BatchSampler, check_block_size, eval_offsets, load_tokens, windows
from .distributed import DistributedEnv, ProcessGroup, StepVotes
from .errors import CheckpointError, CheckpointWriteError, ConfigError, NonFiniteLossError
from .loading import load_valid
from .memory import check_fits
from .invocation import DEFAULT_TRAIN_COMMAND, shell_command
from .metrics import Metrics, MetricsCallback
from .model import GPT
from .optim import apply_hyperparameters, build_optimizer, build_scheduler
from .rundir import RunDir
from .runtime import resolve_device, resolve_dtype, use_deterministic_kernels
from .signals import StopFlag
from .state import Progress, capture_rng_state, restore_rng_state, seed_everything, seed_rank_streams

TIME_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, run again to continue"
# A stop is honoured between optimizer steps; a step longer than this would outlast the ~30 s
# grace period that preemption usually gives (Kubernetes, many schedulers) before its SIGKILL.
SLOW_STEP_SECONDS = 20.0


class _Window:
    """Train losses and throughput since the last evaluation line (display only, not state)."""

    def __init__(self) -> None:
        self.slowest_step = 0.0
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.slowest_step = max(self.slowest_step, seconds)

    def summary(self) -> tuple[Optional[float], Optional[float]]:
        """(mean train loss, tokens/s) since the last reset; (None, None) before any step."""
        if not self.losses:
            return None, None
        return sum(self.losses) / len(self.losses), self.tokens / (time.perf_counter() - self.started)


@dataclass
class RunResult:
    """What a call to :meth:`Trainer.run` did."""

    step: int
    stop_reason: Optional[str]  # None when training reached max_steps
    exit_code: int
    step_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss over all ranks)
    last_checkpoint: Optional[Path] = None


class Trainer:
    """Build everything for ``cfg`` (resuming if asked), then :meth:`run`.

    ``stop`` lets a caller share a stop flag (signals install on it during
    :meth:`run`); ``explicit`` names the flags typed on the command line (see
    :func:`~nanoresume.config.merge_resumed_config`); ``started`` is the ``time.monotonic()``
    that ``--time-limit`` counts from (default: now; the CLI passes its process start).
    The trainer holds OUT's lock from construction until :meth:`run` returns or :meth:`close`
    is called (``with Trainer(cfg) as t:``). Under torchrun it also owns the process group,
    from construction to :meth:`close`.
    """

    def __init__(self, cfg: TrainConfig, stop: Optional[StopFlag] = None, explicit: Optional[set[str]] = None,
                 on_step: Optional[Callable[["Trainer", int, float], None]] = None,
                 on_metrics: Optional[MetricsCallback] = None, command: Sequence[str] = DEFAULT_TRAIN_COMMAND,
                 started: Optional[float] = None, env: Optional[DistributedEnv] = None) -> None:
        self.stop = stop or StopFlag()
        self.on_step = on_step
        self.on_metrics = on_metrics  # (step, {"train/loss": ...} or {"val/loss": ...}): see metrics.py
        self.command = list(command)  # what the user runs to train: repeated in "Continue with: ..."
        self.started = time.monotonic() if started is None else started
        self._warned_slow_step = False
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()  # restored by close()
        self.env = env or distributed.detect()
        self.device = resolve_device(cfg.device, self.env.local_rank)  # fails before OUT is created
        self.process_group = ProcessGroup(self.env, self.device)
        self.run_dir = RunDir(Path(cfg.out_dir))
        if not log.handlers:  # a program that gave the "nanoresume" logger a handler routes our lines itself
            configure_logging()
        self.console = Console(cfg.max_steps, 0, show_bar=False, log_interval=cfg.log_interval, started=self.started,
                               quiet=not self.env.is_main)  # replaced once the start step is known
        try:
            self._open_run_dir(cfg)
            self._build(cfg, explicit)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a save in flight, then release OUT's lock, the process group and process-wide
        settings; safe to call twice. Raises the error of a background save that failed."""
        try:
            if hasattr(self, "manager"):
                self.manager.close()
        finally:
            torch.use_deterministic_algorithms(self._was_deterministic)
            self.run_dir.close()
            self.process_group.close()

    # ---- building ----------------------------------------------------------------------------

    def _open_run_dir(self, cfg: TrainConfig) -> None:
        """Rank 0 alone creates, checks and locks OUT; a failure there stops every rank."""
        error = None
        if self.env.is_main:
            try:
                _check_resume_path_exists(cfg)  # before OUT is created
                self.run_dir.open(self.console.warn)
            except Exception as e:
                error = e
        distributed.raise_if_any_failed(error)

    def _resolve_resume(self, cfg: TrainConfig) -> tuple[Optional[tuple[Path, dict[str, Any]]],
                                                         Optional[dict[str, Any]]]:
        """(checkpoint to resume from, the config.json of a run killed before its first checkpoint).

        Rank 0 picks and loads the checkpoint and hands it to every rank, so ranks that see a
        shared folder differently (stale caches) cannot disagree, and the others never need to
        read OUT at all. With ``--resume auto`` and no checkpoint, rank 0 reads ``OUT/config.json``.
        """
        found, error = (None, None), None
        if self.env.is_main:
            try:
                resumed = checkpoint.resolve_resume(cfg.resume, checkpoint.CheckpointDir(self.run_dir.checkpoints),
                                                    self.console.warn, advice=self.run_dir.checkpoint_advice,
                                                    load=lambda path: load_valid(path, tensors=False))
                unsaved = self.run_dir.read_config() if resumed is None and cfg.resume == "auto" else None
                found = (resumed, unsaved)
            except Exception as e:
                error = e
        distributed.raise_if_any_failed(error)
        return distributed.broadcast_object(found)

    def _build(self, cfg: TrainConfig, explicit: Optional[set[str]]) -> None:
        env = self.env
        resumed, unsaved_config = self._resolve_resume(cfg)
        if resumed is not None:
            saved_world = int(resumed[1].get("world_size", 1))
            cfg, changes = merge_resumed_config(resumed[1]["config"], cfg, explicit, saved_world, env.world_size)
            for change in changes:
                self.console.log(f"changed on resume: {change}")
        elif unsaved_config is not None:
            # A run killed before its first checkpoint: train the run its config.json describes again,
            # from step 0, with the flags given now applied and checked as on a resume.
            cfg, changes = merge_resumed_config(unsaved_config, cfg, explicit,
                                                int(unsaved_config.get("world_size", 1)), env.world_size,
                                                source=str(self.run_dir.config),
                                                must_match=(*ARCHITECTURE_FIELDS, "data", "token_dtype"))
            for change in changes:
                self.console.log(f"changed since the last start: {change}")
        problems = validate(cfg)  # the CLI defers this when resuming: flags only make sense merged
        if problems:
            raise ConfigError("; ".join(problems))
        self.cfg = cfg
        check_fits(cfg, self.device)  # before a size that cannot fit hangs in the allocator
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self._choose_parallelism(cfg)
        self.manager = checkpoint.CheckpointManager(
            self.run_dir.checkpoints, cfg.effective_ckpt_interval, cfg.keep_last, background=cfg.async_save,
            every_seconds=cfg.ckpt_minutes * 60 if cfg.ckpt_minutes is not None else None,
            # a folder's writes coordinate over a group of their own: they may run on the writer thread
            group=distributed.new_group() if self.folder_checkpoints else None,
            token=str(distributed.broadcast_object(os.getpid())), coordinator=env.is_main,
            on_commit=lambda step, path: setattr(self.stop, "last_committed_step", step),
            advice=self.run_dir.checkpoint_advice)
        self._newest_checkpoint: Optional[int] = None  # staged or committed: the step a resume would restart at
        self._pending_best: Optional[dict[str, Any]] = None  # best.pt weights waiting for this step's save
        if cfg.deterministic:
            use_deterministic_kernels()  # before cuBLAS first starts; close() restores the global flag
        self.data = self._load_data(cfg)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.raw_model = GPT(cfg.model_config()).to(self.device)
        seed_rank_streams(cfg.seed, env.rank)  # dropout differs between ranks (rank 0 keeps the plain seed)
        if self.sharded_model:
            parallel.shard(self.raw_model, self.raw_model.blocks, self.device, env.world_size, self.dtype)
        compiled = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.model = (DistributedDataParallel(compiled, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None) if distributed.active() and not self.sharded_model
                      else compiled)
        self.optimizer = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.sampler = BatchSampler(len(self.data.train), cfg.block_size, cfg.global_batch(env.world_size), cfg.seed)
        self.val_batches = eval_offsets(len(self.data.val), cfg.block_size, cfg.eval_iters, cfg.batch_size)
        self.progress = Progress()
        self._last_eval_seconds = 0.0
        self._slowest_step = 0.0
        self._votes: Optional[StepVotes] = None  # the last step's collective decisions
        self._background_error: Optional[Exception] = None
        self._eval_model = compiled  # never the DDP wrapper: evaluation needs no gradient sync

        if resumed is not None:
            self._resume_from(*resumed)
        elif unsaved_config is not None:
            self.console.log(f"no checkpoint in {self.run_dir.checkpoints} yet: training the run that "
                             f"{self.run_dir.config} describes again, from step 0")
        elif cfg.resume == "auto":
            self.console.log(f"no checkpoint in {self.run_dir.checkpoints}; starting a new run")
        self.resumed_from = resumed[0] if resumed else None
        if env.is_main:
            self.run_dir.write_config({**cfg.to_dict(), **derived_fields(cfg, env.world_size)})

    def _choose_parallelism(self, cfg: TrainConfig) -> None:
        """FSDP or not (``sharded_model``), and files or folders (``folder_checkpoints``)."""
        self.sharded_model = cfg.parallel == "fsdp" and self.env.launched
        if cfg.parallel == "fsdp" and not self.env.launched:
            self.console.warn("--parallel fsdp: a single process has nothing to share the model with, so it "
                              "trains the whole model (launch with torchrun to shard it)")
        if self.sharded_model and self.dtype == torch.float16:
            raise ConfigError("--dtype float16 with --parallel fsdp: the gradient scaler cannot see a sharded "
                              "model's overflows; use --dtype bfloat16 or float32")
        self.folder_checkpoints = cfg.ckpt_format == "sharded" or (cfg.ckpt_format == "auto" and self.sharded_model)

    def _load_data(self, cfg: TrainConfig) -> Any:
        """Rank 0 tokenizes (and fills the cache) first; the others then read the cache."""
        data, error = None, None
        for turn in ("main", "others"):
            if (turn == "main") == self.env.is_main:
                try:
                    data = load_tokens(cfg.data, cfg.val_fraction, cfg.cache_dir, cfg.token_dtype, cfg.vocab_size,
                                       warn=self.console.warn)
                    check_block_size(data, cfg.block_size)
                except Exception as e:
                    error = e
            distributed.raise_if_any_failed(error if (turn == "main") == self.env.is_main else None)
        return data

    def _resume_from(self, path: Path, state: dict[str, Any]) -> None:
        self._check_same_data(path, state)
        if path.is_dir():  # a folder: every rank reads the shards it needs (state holds no tensors of them)
            parallel.load_folder(path, self.raw_model, self.optimizer, distributed.default_group())
            self._load_training_state(state)
        else:
            self.load_state_dict(state)
        self.stop.last_committed_step = self._newest_checkpoint = self.progress.step
        self.console.log(f"resumed from {path} at step {self.progress.step:,}")
        if not self.env.is_main:
            return
        self.manager.adopt(path, self.progress.step, self.console.warn)  # newer checkpoints are set aside

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The full training state in the file layout: rank 0 gets every rank's RNG streams, and under
        FSDP the whole model and optimizer on its CPU (a collective under torchrun).

        Holds references to live tensors: save or copy it before the next step.
        """
        rank_states = distributed.gather_objects({"rank": self.env.rank, "rng": capture_rng_state()})
        model, optimizer = parallel.file_state(self.raw_model, self.optimizer, self.sharded_model)
        return self._training_state(model, optimizer, rank_states)

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's part of a checkpoint folder (see :mod:`nanoresume.parallel`): its shards of the
        model and optimizer, its own RNG streams, and what every rank holds alike. Gathers nothing."""
        model, optimizer = parallel.sharded_state(self.raw_model, self.optimizer)
        # A key per rank: DCP keeps one copy of a key that every rank saves.
        return schema.for_folder(self._training_state(
            model, optimizer, {str(self.env.rank): {"rank": self.env.rank, "rng": capture_rng_state()}}))

    def _training_state(self, model: dict[str, Any], optimizer: dict[str, Any], ranks: Any) -> dict[str, Any]:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "kind": "train",
            **self.progress.state_dict(),
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "data": {"fingerprint": self.data.fingerprint, "source": self.data.source},
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),  # the same on every rank: batches depend on the step only
            "ranks": ranks,  # one entry per rank: its own random number streams
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state in the file layout (every rank passes all of it; under FSDP each keeps its shards)."""
        parallel.load_file_state(self.raw_model, self.optimizer, state["model"], state["optimizer"],
                                 self.sharded_model)
        self._load_training_state(state)

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """Everything but the model and the optimizer's tensors."""
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and not state["scaler"]:
            self.console.warn("the checkpoint was not trained in float16: starting a new gradient scaler")
        else:
            self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state)
        apply_hyperparameters(self.optimizer, self.scheduler, self.cfg.lr, (self.cfg.beta1, self.cfg.beta2),
                              self.cfg.weight_decay)
        self.sampler.load_state_dict(state["sampler"])
        ranks = state["ranks"]
        if len(ranks) == self.env.world_size:
            for warning in restore_rng_state(ranks[self.env.rank]["rng"]):
                self.console.warn(warning)
        else:
            seed_rank_streams(self.cfg.seed, self.env.rank, self.progress.step)
            self.console.warn(f"the checkpoint was written by {len(ranks)} process(es), this run has "
                              f"{self.env.world_size}: model, optimizer and data order continue exactly, but "
                              f"each rank's random numbers (dropout) start new streams")

    def _check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        saved = state["data"]["fingerprint"]
        if saved != self.data.fingerprint:
            raise CheckpointError(
                f"cannot resume from {path}: the training data differs (fingerprint {saved[:12]} in the "
                f"checkpoint, {self.data.fingerprint[:12]} for {self.data.source}); pass the same --data, "
                f"or choose another --out-dir for a new run")

    # ---- one step, one evaluation ------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.sharded_model:  # FSDP2 casts through its own policy
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss over all ranks, grad norm).

        Also takes this step's collective decisions (:meth:`_agree`) before the weights change.
        """
        total_loss = torch.zeros((), device=self.device)
        micro_batches = self.sampler.next_micro_batches(self.env.rank, self.env.world_size, self.cfg.grad_accum)
        for i, offsets in enumerate(micro_batches):
            x, y = (t.to(self.device, non_blocking=True) for t in windows(self.data.train, offsets,
                                                                          self.cfg.block_size))
            last = i == len(micro_batches) - 1
            # Under DDP only the last micro-batch all-reduces the gradients; FSDP reduce-scatters each
            # micro-batch's, keeping only this rank's shard of the sum.
            ddp = isinstance(self.model, DistributedDataParallel)
            sync = self.model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync, self.autocast():
                _, loss = self.model(x, y)
            with sync:
                self.scaler.scale(loss / self.cfg.grad_accum).backward()
            total_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = parallel.replicated(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm))
        votes = self._agree(total_loss / self.cfg.grad_accum, grad_norm)
        if votes.save_failed:
            raise self._save_failure()
        if votes.any_nonfinite_loss:
            raise NonFiniteLossError(
                f"training loss is {votes.loss} at step {self.progress.step + 1}; nothing from that step was "
                f"saved ({self._newest_saved()}). Lower --lr, raise --warmup-steps or use --dtype "
                f"bfloat16/float32, then rerun with --resume auto")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return votes.loss, votes.grad_norm

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> StepVotes:
        """This step's decisions, the same on every rank: one small collective and one device sync.

        A background save that failed is found here (rank 0 polls its writer) and stops every rank
        at this step, as a synchronous failure would have.
        """
        failed = False
        if self.env.is_main:
            try:
                self.manager.poll()
            except CheckpointWriteError as e:
                self._background_error, failed = e, True
        self._votes = distributed.agree(
            loss, grad_norm, stop_code=self.stop.exit_code if self.stop.is_set() else 0,
            time_up=self.env.is_main and self._time_is_up(),
            save_time_due=self.env.is_main and self.manager.time_due(), save_failed=failed)
        if self._votes.stop_code and not self.stop.is_set():
            self.stop.request(*StopFlag.describe(self._votes.stop_code))  # a signal another rank received
        if self._votes.time_up:
            self.stop.request("time limit", TIME_LIMIT_EXIT_CODE)
        return self._votes

    def _save_failure(self) -> Exception:
        if self.env.is_main:
            return self._background_error
        return distributed.PeerError("rank 0 could not write a checkpoint; see its error", 1)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed validation batches; None if a stop request arrived during it.

        A stop requested before it started does not cut it short: an evaluation that is due is
        part of the step, and skipping it would change best.pt and the checkpoint written at the
        stop. Under torchrun the batches are shared out between ranks, and an evaluation is never
        cut short (the ranks would have to agree on it batch by batch).
        """
        stop_already_requested = self.stop.is_set()
        rank, world, count = self.env.rank, self.env.world_size, len(self.val_batches)
        mine = list(range(rank, count, world))
        if self.sharded_model:  # each forward gathers weights with every rank: all must run as many
            mine += [-1] * (-(-count // world) - len(mine))  # (-1: a repeat whose loss counts for nothing)
        self._eval_model.eval()
        try:
            losses = torch.zeros(count, dtype=torch.float64, device=self.device)
            for i in mine:
                if world == 1 and self.stop.is_set() and not stop_already_requested:
                    return None
                offsets = self.val_batches[max(i, 0)]
                x, y = (t.to(self.device) for t in windows(self.data.val, offsets, self.cfg.block_size))
                with self.autocast():
                    _, loss = self._eval_model(x, y)
                if i >= 0:
                    losses[i] = loss.double()
            # Each batch's loss comes from exactly one rank; the sum over ranks just collects them.
            per_batch = distributed.all_sum(losses).tolist()
            return sum(per_batch) / len(per_batch)
        finally:
            self._eval_model.train()

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until ``max_steps`` or a stop request; always save before returning."""
        cfg, progress = self.cfg, self.progress
        result = RunResult(step=progress.step, stop_reason=None, exit_code=0)
        self.console = Console(cfg.max_steps, progress.step, show_bar=wants_bar(cfg.progress),
                               log_interval=cfg.log_interval, started=self.started, quiet=not self.env.is_main)
        if not self.stop.can_install():
            self.console.warn("not in the main thread: signals will not stop training gracefully")
        # Handlers stay installed through teardown, where a signal forces an immediate exit.
        with self.stop.installed(), contextlib.ExitStack() as cleanup:  # every close runs, even if one fails
            cleanup.callback(self.close)
            cleanup.callback(self.console.close)
            metrics = Metrics(self.run_dir.tensorboard, self.run_dir.metrics, self.console.warn, self.on_metrics,
                              enabled=self.env.is_main)  # creates no file before start()
            cleanup.callback(metrics.close)
            cleanup.callback(setattr, self.stop, "exit_on_signal", True)  # runs first: nothing left to save
            self.console.log(self._start_message())
            if progress.step >= cfg.max_steps and not self._evaluation_due():
                self.console.log(f"already at step {progress.step:,} of --max-steps {cfg.max_steps:,}; "
                                 f"nothing to do (raise --max-steps to train longer)")
                if self.env.is_main:
                    self.run_dir.write_exit_code(0)
                return result
            self._start_metrics(metrics)
            self._loop(metrics, result)
        return result

    def _start_metrics(self, metrics: Metrics) -> None:
        """Log from the first step this start trains: a resume from step R continues at R + 1, a new
        run (or one killed before its first checkpoint) at 0, dropping what earlier starts logged there."""
        first_logged = self.progress.step + 1 if self.resumed_from else 0
        last_lost = metrics.start(first_logged, self.cfg.to_dict())
        first_trained = self.progress.step + 1
        if last_lost is not None and last_lost >= first_trained:
            steps = f"step {first_trained:,}" if last_lost == first_trained else \
                f"steps {first_trained:,}-{last_lost:,}"
            self.console.log(f"{steps} trained before the last stop were never saved: lost, training again")

    def _loop(self, metrics: Metrics, result: RunResult) -> None:
        cfg, progress = self.cfg, self.progress
        window = _Window()
        if self._evaluation_due():  # step 0 of a new run, or one a stop cut short before the restart
            self._evaluate_and_log(metrics, window)
            self._save_if_due(force=False)
        while progress.step < cfg.max_steps and not self._stop_agreed():
            step_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the step's own: train_step moves the schedule on
            loss, grad_norm = self.train_step()
            seconds = time.perf_counter() - step_start
            progress.step += 1
            progress.tokens_seen += cfg.tokens_per_step(self.env.world_size)
            self._log_step(metrics, window, loss, lr, grad_norm, seconds)
            self._warn_if_slow(seconds)
            result.step_losses.append((progress.step, loss))
            if self.on_step is not None:
                self.on_step(self, progress.step, loss)
            if self._evaluation_due():
                self._evaluate_and_log(metrics, window)
            self._save_if_due(force=progress.step == cfg.max_steps or self._stop_agreed(),
                              time_due=self._votes.save_time_due)
        result.step = progress.step
        # Covers a stop before the first step, and a final evaluation redone after a restart;
        # a no-op when this step is already saved.
        self._save_if_due(force=self._stop_agreed() or progress.step == cfg.max_steps)
        if self.env.is_main or self.folder_checkpoints:
            self.manager.wait()  # the stop message names a committed checkpoint, never one still in flight
        distributed.barrier()  # no rank exits (and makes torchrun stop the others) before that commit
        result.last_checkpoint = self.manager.committed_path
        unfinished = progress.step < cfg.max_steps or self._evaluation_due()  # e.g. a cut-short final eval
        if self._stop_agreed() and unfinished:
            result.stop_reason, result.exit_code = self.stop.reason, self.stop.exit_code
            self.console.log(self._stopped_message(result.last_checkpoint))
        elif not unfinished:
            self.console.log(self._finished_message())
        if self.env.is_main:
            self.run_dir.write_exit_code(result.exit_code)

    def _stop_agreed(self) -> bool:
        """Single process: the stop flag. Under torchrun: what the ranks agreed on at the last step
        (so all of them stop after the same step)."""
        if not distributed.active():
            return self.stop.is_set()
        return self._votes is not None and bool(self._votes.stop_code or self._votes.time_up)

    def _log_step(self, metrics: Metrics, window: "_Window", loss: float, lr: float, grad_norm: float,
                  seconds: float) -> None:
        tokens = self.cfg.tokens_per_step(self.env.world_size)
        window.add(loss, tokens, seconds)
        self._slowest_step = max(self._slowest_step, seconds)
        metrics.log(self.progress.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                         "train/tokens_per_s": tokens / seconds})
        self.console.advance(self.progress.step, loss, lr, tokens, seconds)

    def _warn_if_slow(self, seconds: float) -> None:
        if seconds > SLOW_STEP_SECONDS and not self._warned_slow_step:
            self._warned_slow_step = True
            self.console.warn(f"step {self.progress.step:,} took {seconds:.0f} s; a stop signal waits for the "
                              f"step to end, so it may outlast a ~30 s preemption grace period. Lower "
                              f"--grad-accum (or --batch-size) for shorter steps")

    def _evaluation_due(self) -> bool:
        step = self.progress.step
        due = step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps
        return due and self.progress.evaluated_step != step

    def _save_if_due(self, force: bool, time_due: bool = False) -> None:
        """Save this step's checkpoint when it is due (or forced), and best.pt when the evaluation of
        this step improved it: one save, staged now, committed now or in the background.

        Every rank takes the same decision. A file: each rank hands rank 0 its RNG streams (and under
        FSDP its shards), and rank 0 alone writes. A folder: every rank writes its own part. In
        synchronous mode every rank waits for the commit.
        """
        step = self.progress.step
        due = (step > 0 or force) and self.manager.is_due(step, force, time_due=time_due)
        state = self._checkpoint_state() if due else None
        best = [(self.run_dir.best, self._pending_best)] if self._pending_best is not None else []
        self._pending_best = None
        if state is not None:
            self._newest_checkpoint = step
        if self.folder_checkpoints and state is not None:
            self.manager.save(step, state, also=best, sharded=True)
        elif self.env.is_main and (state is not None or best):
            self.manager.save(step, state, also=best)
        elif state is not None:
            self.manager.mark_staged(step)  # the decision is shared; the file is rank 0's
        if due and not self.manager.background:
            distributed.barrier()

    def _checkpoint_state(self) -> dict[str, Any]:
        """This step's checkpoint (or this rank's part of it); never one holding NaN/inf weights."""
        bad = next((name for name, p in self.raw_model.named_parameters()
                    if not torch.isfinite(parallel.local(p)).all()), None)
        error = None if bad is None else NonFiniteLossError(
            f"parameter {bad} holds NaN/inf at step {self.progress.step}; not saving it. Lower --lr, then rerun "
            f"with --resume auto")
        if self.sharded_model:
            distributed.raise_if_any_failed(error)  # each rank sees only its shards
        elif error is not None:
            raise error
        return self.sharded_state_dict() if self.folder_checkpoints else self.state_dict()

    def _evaluate_and_log(self, metrics: Metrics, window: "_Window") -> None:
        train_loss, tokens_per_second = window.summary()
        started = time.perf_counter()
        val_loss = self.evaluate()
        self._last_eval_seconds = time.perf_counter() - started
        if val_loss is None:
            return  # cut short by a stop request: an incomplete eval must not touch best.pt
        step = self.progress.step
        self.progress.evaluated_step = step
        ppl = math.exp(min(val_loss, 50.0))
        metrics.log(step, {"val/loss": val_loss, "val/perplexity": ppl})
        train = f"{train_loss:.4f}" if train_loss is not None else "-"
        rate = f"{tokens_per_second:,.0f} tok/s" if tokens_per_second is not None else "-"
        self.console.log(f"step {step:>6} | train loss {train} | val loss {val_loss:.4f} | "
                         f"val ppl {ppl:.2f} | {rate}")
        window.reset()
        if val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss = val_loss
            weights = parallel.full_weights(self.raw_model, self.sharded_model)  # under FSDP a collective
            if self.env.is_main:
                self._pending_best = schema.weights_state(
                    weights, dataclasses.asdict(self.cfg.model_config()), step, self.progress.tokens_seen, val_loss)

    def _time_is_up(self) -> bool:
        """Whether to stop after this step, while there is still time for one more step, an
        evaluation and a save (with room to spare). Rank 0's clock decides for every rank."""
        if self.cfg.time_limit is None:
            return False
        needed = 2 * self._slowest_step + self._last_eval_seconds + 2 * self.manager.last_commit_seconds + 1.0
        return time.monotonic() - self.started + needed >= self.cfg.time_limit

    def _newest_saved(self) -> str:
        step = self._newest_checkpoint
        return "no checkpoint yet" if step is None else f"newest checkpoint: step {step}"

    def _start_message(self) -> str:
        params = self.raw_model.num_parameters()
        cfg, world = self.cfg, self.env.world_size
        processes = (f", {world} processes x batch {cfg.batch_size} x accumulation {cfg.grad_accum} = "
                     f"global batch {cfg.global_batch(world):,}" if world > 1 else "")
        if self.sharded_model:
            processes += f", sharded over {world} process{'es' if world > 1 else ''} (FSDP2)"
        return (f"training steps {self.progress.step:,} -> {cfg.max_steps:,} on {self.device.type} "
                f"({str(self.dtype).removeprefix('torch.')}), {params / 1e6:.2f}M parameters, "
                f"{cfg.tokens_per_step(world):,} tokens/step{processes}; data {self.data.describe()}")

    def _stopped_message(self, saved: Optional[Path]) -> str:
        where = f"saved {saved}" if saved is not None else "nothing new to save"
        again = shell_command([*self.command, "--out-dir", self.cfg.out_dir, "--resume", "auto"])
        return f"stopped by {self.stop.reason} after step {self.progress.step:,}; {where}. Continue with: {again}"

    def _finished_message(self) -> str:
        best = self.progress.best_val_loss
        best_text = f"best val loss {best:.4f} in {self.run_dir.best}" if math.isfinite(best) else \
            "no validation loss yet"
        return (f"finished: {self.progress.step:,} steps, {self.progress.tokens_seen:,} tokens, {best_text}, "
                f"wall time {format_elapsed(time.monotonic() - self.started)}")


def _check_resume_path_exists(cfg: TrainConfig) -> None:
    """An explicit ``--resume PATH`` that does not exist fails before OUT is created."""
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).expanduser().exists():
        raise CheckpointError(f"--resume {cfg.resume}: no such checkpoint file or folder; pass an existing "
                              f"OUT/checkpoints/step_* checkpoint, or --resume auto")
