"""The training loop: wires config, data, model, optimizer, checkpoints, signals and metrics.

``Trainer(cfg).run()`` trains until ``max_steps`` or a stop request, saving a
checkpoint on the interval, at the end, and whenever it stops. Everything that
must survive a restart goes through :meth:`Trainer.state_dict` /
:meth:`Trainer.load_state_dict`, so a resumed run is bit-for-bit the one that
never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import checkpoint
from .config import ARCHITECTURE_FIELDS, RUNTIME_FIELDS, TrainConfig, config_from_dict, flag, validate
from .data import BatchSampler, check_block_size, eval_offsets, load_tokens, windows
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .loading import load_valid
from .console import Console, configure_logging, format_elapsed, log, wants_bar
from .invocation import DEFAULT_TRAIN_COMMAND, shell_command
from .metrics import Metrics, MetricsCallback
from .model import GPT
from .optim import build_optimizer, build_scheduler
from .rundir import RunDir
from .runtime import resolve_device, resolve_dtype, use_deterministic_kernels
from .signals import StopFlag
from .state import Progress, capture_rng_state, restore_rng_state, seed_everything

TIME_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, run again to continue"


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
    step_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of this process
    last_checkpoint: Optional[Path] = None


def merge_resumed_config(saved: dict[str, Any], current: TrainConfig, explicit: Optional[set[str]],
                         source: str = "the checkpoint", must_match: Sequence[str] = ARCHITECTURE_FIELDS,
                         ) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the saved one (``source``), overridden by flags given now.

    ``explicit`` names the flags the user typed (None: every field counts as given,
    as in library use). Raises :class:`CheckpointError` naming every field of
    ``must_match`` (those that define the model or data) that differs; returns the
    merged config and a line per other changed field.
    """
    base = config_from_dict(saved)
    given = {f.name for f in dataclasses.fields(TrainConfig)} if explicit is None else set(explicit)
    merged = dataclasses.replace(base, **{name: getattr(current, name) for name in given | set(RUNTIME_FIELDS)})
    mismatches = [f"{flag(name)} is {getattr(base, name)!r} in {source} but {getattr(merged, name)!r} now"
                  for name in must_match if getattr(base, name) != getattr(merged, name)]
    if mismatches:
        raise CheckpointError("cannot resume: " + "; ".join(mismatches)
                              + f". Pass the values in {source}, or choose another --out-dir for a new run")
    changes = [f"{flag(f.name)}: {getattr(base, f.name)!r} -> {getattr(merged, f.name)!r}"
               + (" (no effect: the data order and random numbers continue from the checkpoint)"
                  if f.name == "seed" else "")
               for f in dataclasses.fields(TrainConfig)
               if f.name not in RUNTIME_FIELDS and getattr(base, f.name) != getattr(merged, f.name)]
    return merged, changes


class Trainer:
    """Build everything for ``cfg`` (resuming if asked), then :meth:`run`.

    ``stop`` lets a caller share a stop flag (signals install on it during
    :meth:`run`); ``explicit`` names the flags typed on the command line (see
    :func:`merge_resumed_config`). The trainer holds OUT's lock from construction
    until :meth:`run` returns or :meth:`close` is called (``with Trainer(cfg) as t:``).
    """

    def __init__(self, cfg: TrainConfig, stop: Optional[StopFlag] = None, explicit: Optional[set[str]] = None,
                 on_step: Optional[Callable[["Trainer", int, float], None]] = None,
                 on_metrics: Optional[MetricsCallback] = None,
                 command: Sequence[str] = DEFAULT_TRAIN_COMMAND) -> None:
        self.stop = stop or StopFlag()
        self.on_step = on_step
        self.on_metrics = on_metrics  # (step, {"train/loss": ...} or {"val/loss": ...}): see metrics.py
        self.command = list(command)  # what the user runs to train: repeated in "Continue with: ..."
        self.started = time.monotonic()
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()  # restored by close()
        if not log.handlers:  # a program that gave the "nanoresume" logger a handler routes our lines itself
            configure_logging()
        self.run_dir = RunDir(Path(cfg.out_dir))
        self.console = Console(cfg.max_steps, 0, show_bar=False, log_interval=cfg.log_interval,
                               started=self.started)  # replaced once the start step is known
        self.run_dir.open(self.console.warn)
        try:
            self._build(cfg, explicit)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release OUT's lock and restore process-wide settings; safe to call twice."""
        torch.use_deterministic_algorithms(self._was_deterministic)
        self.run_dir.close()

    def _build(self, cfg: TrainConfig, explicit: Optional[set[str]]) -> None:
        manager = checkpoint.CheckpointManager(self.run_dir.checkpoints, cfg.effective_ckpt_interval, cfg.keep_last)
        resumed = checkpoint.resolve_resume(cfg.resume, manager, self.console.warn, load=load_valid)
        restarting = False  # True: a run killed before its first checkpoint, trained again from step 0
        if resumed is not None:
            cfg, changes = merge_resumed_config(resumed[1]["config"], cfg, explicit)
            manager.interval, manager.keep_last = cfg.effective_ckpt_interval, cfg.keep_last
            for change in changes:
                self.console.log(f"changed on resume: {change}")
        elif cfg.resume == "auto":
            cfg, restarting = self._config_of_unsaved_run(cfg, explicit)
            manager.interval, manager.keep_last = cfg.effective_ckpt_interval, cfg.keep_last
        problems = validate(cfg)  # the CLI defers this when resuming: flags only make sense merged
        if problems:
            raise ConfigError("; ".join(problems))
        self.cfg, self.manager = cfg, manager
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.deterministic:
            use_deterministic_kernels()  # before cuBLAS first starts; close() restores the global flag
        self.data = load_tokens(cfg.data, cfg.val_fraction, cfg.cache_dir, cfg.token_dtype, cfg.vocab_size)
        check_block_size(self.data, cfg.block_size)

        seed_everything(cfg.seed)
        self.raw_model = GPT(cfg.model_config()).to(self.device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.optimizer = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.sampler = BatchSampler(len(self.data.train), cfg.block_size, cfg.batch_size, cfg.seed)
        self.val_batches = eval_offsets(len(self.data.val), cfg.block_size, cfg.eval_iters, cfg.batch_size)
        self.progress = Progress()

        if resumed is not None:
            path, state = resumed
            self._check_same_data(path, state)
            self.load_state_dict(state)
            self.console.log(f"resumed from {path} at step {self.progress.step:,}")
            for moved in manager.set_aside_after(self.progress.step):
                self.console.warn(f"moved {moved.name} to {moved.parent}: it is newer than the checkpoint this "
                                  f"run resumed from, so it belongs to a timeline the run left")
        elif restarting:
            self.console.log(f"no checkpoint in {self.run_dir.checkpoints} yet: training the run that "
                             f"{self.run_dir.config} describes again, from step 0")
        elif cfg.resume == "auto":
            self.console.log(f"no checkpoint in {self.run_dir.checkpoints}; starting a new run")
        self.resumed_from = resumed[0] if resumed else None
        self.run_dir.write_config(cfg.to_dict())

    def _config_of_unsaved_run(self, cfg: TrainConfig, explicit: Optional[set[str]]) -> tuple[TrainConfig, bool]:
        """``--resume auto`` and no checkpoint: a run killed before its first one still left
        OUT/config.json. Train that run again from step 0 (True), its settings overridden by
        the flags given now and checked like a resume's; with no config.json, ``cfg`` (False)."""
        saved = self.run_dir.read_config()
        if saved is None:
            return cfg, False
        merged, changes = merge_resumed_config(saved, cfg, explicit, source=str(self.run_dir.config),
                                               must_match=(*ARCHITECTURE_FIELDS, "data", "token_dtype"))
        for change in changes:
            self.console.log(f"changed since the last start: {change}")
        return merged, True

    # ---- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The full training state. Holds references to live tensors: write it before the next step."""
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "kind": "train",
            **self.progress.state_dict(),
            "config": self.cfg.to_dict(),
            "data": {"fingerprint": self.data.fingerprint, "source": self.data.source},
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # One entry per data-parallel rank: each has its own RNG streams and sampler.
            "ranks": [{"rank": 0, "rng": capture_rng_state(), "sampler": self.sampler.state_dict()}],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and not state["scaler"]:
            self.console.warn("the checkpoint was not trained in float16: starting a new gradient scaler")
        else:
            self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state)
        self._apply_hyperparameters()
        rank_state = state["ranks"][0]
        self.sampler.load_state_dict(rank_state["sampler"])
        for warning in restore_rng_state(rank_state["rng"]):
            self.console.warn(warning)

    def _apply_hyperparameters(self) -> None:
        """Loading an optimizer restores its saved hyperparameters; re-apply the current flags
        (a no-op, bit for bit, when they did not change)."""
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, decays in zip(self.optimizer.param_groups, (True, False)):
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * factor
            group["betas"] = (self.cfg.beta1, self.cfg.beta2)
            group["weight_decay"] = self.cfg.weight_decay if decays else 0.0

    def _check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        saved = state["data"]["fingerprint"]
        if saved != self.data.fingerprint:
            raise CheckpointError(
                f"cannot resume from {path}: the training data differs (fingerprint {saved[:12]} in the "
                f"checkpoint, {self.data.fingerprint[:12]} for {self.data.source}); pass the same --data, "
                f"or choose another --out-dir for a new run")

    # ---- one step, one evaluation ----------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, grad norm)."""
        total_loss = torch.zeros((), device=self.device)
        for _ in range(self.cfg.grad_accum):
            x, y = (t.to(self.device, non_blocking=True) for t in windows(
                self.data.train, self.sampler.next_offsets(), self.cfg.block_size))
            with self.autocast():
                _, loss = self.model(x, y)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
            total_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        # One device sync per step for both numbers; the weights are untouched until scaler.step.
        mean_loss, grad_norm_value = torch.stack([total_loss / self.cfg.grad_accum, grad_norm.float()]).tolist()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"training loss is {mean_loss} at step {self.progress.step + 1}; nothing from that step was "
                f"saved (newest checkpoint: step {self.manager.last_saved_step}). Lower --lr, raise "
                f"--warmup-steps or use --dtype bfloat16/float32, then rerun with --resume auto")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return mean_loss, grad_norm_value

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed validation batches; None if a stop request arrived during it.

        A stop requested before it started does not cut it short: an evaluation that
        is due is part of the step, and skipping it would change best.pt and the
        checkpoint written at the stop.
        """
        stop_already_requested = self.stop.is_set()
        self.model.eval()
        try:
            losses = []
            for offsets in self.val_batches:
                if self.stop.is_set() and not stop_already_requested:
                    return None
                x, y = (t.to(self.device) for t in windows(self.data.val, offsets, self.cfg.block_size))
                with self.autocast():
                    _, loss = self.model(x, y)
                losses.append(loss.item())
            return sum(losses) / len(losses)
        finally:
            self.model.train()

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until ``max_steps`` or a stop request; always save before returning."""
        cfg, progress = self.cfg, self.progress
        result = RunResult(step=progress.step, stop_reason=None, exit_code=0)
        self.console = Console(cfg.max_steps, progress.step, show_bar=wants_bar(cfg.progress),
                               log_interval=cfg.log_interval, started=self.started)
        with contextlib.ExitStack() as cleanup:  # every close runs, even if an earlier one fails
            cleanup.callback(self.close)
            cleanup.callback(self.console.close)
            if not self.stop.can_install():
                self.console.warn("not in the main thread: signals will not stop training gracefully")
            with self.stop.installed():
                self.console.log(self._start_message())
                if progress.step >= cfg.max_steps and not self._evaluation_due():
                    self.console.log(f"already at step {progress.step:,} of --max-steps {cfg.max_steps:,}; "
                                     f"nothing to do (raise --max-steps to train longer)")
                    return result
                metrics = Metrics(self.run_dir.tensorboard, self.run_dir.metrics, self.console.warn, self.on_metrics)
                cleanup.callback(metrics.close)
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
        while progress.step < cfg.max_steps and not self.stop.is_set():
            step_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the step's own: train_step moves the schedule on
            loss, grad_norm = self.train_step()
            progress.step += 1
            progress.tokens_seen += cfg.tokens_per_step
            self._log_step(metrics, window, loss, lr, grad_norm, time.perf_counter() - step_start)
            result.step_losses.append((progress.step, loss))
            if self.on_step is not None:
                self.on_step(self, progress.step, loss)
            if self._evaluation_due():
                self._evaluate_and_log(metrics, window)
            self._check_time_limit(window.slowest_step)
            last = progress.step == cfg.max_steps
            saved = self.manager.maybe_save(progress.step, self._checkpoint_state, force=last or self.stop.is_set())
            result.last_checkpoint = saved or result.last_checkpoint
        result.step = progress.step
        if self.stop.is_set() or progress.step == cfg.max_steps:
            # Covers a stop before the first step, and a final evaluation redone after a restart;
            # a no-op when this step is already saved.
            result.last_checkpoint = self.manager.maybe_save(progress.step, self._checkpoint_state, force=True) \
                or result.last_checkpoint
        unfinished = progress.step < cfg.max_steps or self._evaluation_due()  # e.g. a cut-short final eval
        if self.stop.is_set() and unfinished:
            result.stop_reason, result.exit_code = self.stop.reason, self.stop.exit_code
            self.console.log(self._stopped_message(result.last_checkpoint))
        elif not unfinished:
            self.console.log(self._finished_message())

    def _log_step(self, metrics: Metrics, window: "_Window", loss: float, lr: float, grad_norm: float,
                  seconds: float) -> None:
        tokens = self.cfg.tokens_per_step
        window.add(loss, tokens, seconds)
        metrics.log(self.progress.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                         "train/tokens_per_s": tokens / seconds})
        self.console.advance(self.progress.step, loss, lr, tokens, seconds)

    def _evaluation_due(self) -> bool:
        step = self.progress.step
        due = step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps
        return due and self.progress.evaluated_step != step

    def _checkpoint_state(self) -> dict[str, Any]:
        for name, p in self.raw_model.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(f"parameter {name} holds NaN/inf at step {self.progress.step}; "
                                         f"not saving it. Lower --lr, then rerun with --resume auto")
        return self.state_dict()

    def _evaluate_and_log(self, metrics: Metrics, window: "_Window") -> None:
        train_loss, tokens_per_second = window.summary()
        val_loss = self.evaluate()
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
            self.run_dir.write_best({
                "format_version": checkpoint.FORMAT_VERSION,
                "kind": "weights",
                "model": self.raw_model.state_dict(),
                "model_config": dataclasses.asdict(self.cfg.model_config()),
                "step": step,
                "tokens_seen": self.progress.tokens_seen,
                "val_loss": val_loss,
            })

    def _check_time_limit(self, slowest_step: float) -> None:
        """Stop while there is still time for one more step and a save (with room to spare)."""
        if self.cfg.time_limit is None:
            return
        needed = 2 * slowest_step + 2 * self.manager.last_save_seconds + 1.0
        if time.monotonic() - self.started + needed >= self.cfg.time_limit:
            self.stop.request("time limit", TIME_LIMIT_EXIT_CODE)

    def _start_message(self) -> str:
        params = self.raw_model.num_parameters()
        return (f"training steps {self.progress.step:,} -> {self.cfg.max_steps:,} on {self.device.type} "
                f"({str(self.dtype).removeprefix('torch.')}), {params / 1e6:.2f}M parameters, "
                f"{self.cfg.tokens_per_step:,} tokens/step; data {self.data.describe()}")

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
