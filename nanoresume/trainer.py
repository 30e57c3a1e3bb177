"""The training loop, and the wiring of everything it uses.

``Trainer(cfg).run()`` trains until ``max_steps`` or a stop request, saving on the interval, at the
end, and whenever it stops. The trainer wires; each piece lives in its own module: start-up
decisions in :mod:`~nanoresume.startup`, what a step needs in :mod:`~nanoresume.building`, the
named stateful parts a checkpoint holds in :mod:`~nanoresume.training_parts`, whether to go on in
:mod:`~nanoresume.stopping` (once per step), the save in :mod:`~nanoresume.saving`, the step's log in
:mod:`~nanoresume.steplog`, evaluation in :mod:`~nanoresume.evaluating`, the end of the run in
:mod:`~nanoresume.ending`, and every printed line in :mod:`~nanoresume.messages`.

Under torchrun every rank runs this loop on its share of each global batch (DDP, or FSDP2 with
``--parallel fsdp``); rank 0 alone writes files and logs, and every decision that could differ
between ranks is taken together, once per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed, ending, launcher, messages, parallel, saving, startup
from .building import build_step_parts
from .checkpoint.observe import WriteCancelled
from .config import TrainConfig, derived_fields
from .console import Console, configure_logging, log, wants_bar
from .data import windows
from .distributed import DistributedEnv, ProcessGroup
from .ending import RunResult
from .errors import NonFiniteLossError
from .evaluating import Evaluation, validation_loss
from .memory import check_fits
from .invocation import DEFAULT_TRAIN_COMMAND
from .metrics import Metrics, MetricsCallback
from .mirror.link import MirrorLink
from .rundir import RunDir
from .runtime import resolve_device, resolve_dtype, use_deterministic_kernels
from .samples import EvalSamples
from .signals import StopFlag
from .startup import StartMode
from .steplog import StepLog
from .stopping import CONTINUE, FINISHED, Outcome, StepDecisions

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
                 started: Optional[float] = None, env: Optional[DistributedEnv] = None,
                 continue_in: str = "shell") -> None:
        self.stop = stop or StopFlag()
        # How the stop message says to continue: "shell" (the command), "notebook" (run the cell again), "python".
        self.continue_in = continue_in
        self.on_step = on_step
        self.on_metrics = on_metrics  # (step, {"train/loss": ...} or {"val/loss": ...}): see metrics.py
        self.command = list(command)  # what the user runs to train: repeated in "Continue with: ..."
        self.started = time.monotonic() if started is None else started
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()  # restored by close()
        self.env = env or distributed.detect()
        # torchrun's command line, for the stop message: read now, the launcher may be gone by then
        self._launcher = launcher.launcher_command() if self.env.launched else None
        if self.env.launched:
            launcher.stop_when_launcher_dies_once()  # a SIGKILLed torchrun stops its workers with a save
        self.device = resolve_device(cfg.device, self.env.local_rank)  # fails before OUT is created
        self.process_group = ProcessGroup(self.env, self.device)
        self.run_dir = RunDir(Path(cfg.out_dir))
        if not log.handlers:  # a program that gave the "nanoresume" logger a handler routes our lines itself
            configure_logging()
        self.console = Console(cfg.max_steps, 0, show_bar=False, log_interval=cfg.log_interval, started=self.started,
                               quiet=not self.env.is_main)  # replaced once the start step is known
        try:
            self._build(cfg, explicit)
        except BaseException:
            with self.stop.protected():  # OUT's lock is released even if the user insists
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
        except WriteCancelled:
            pass  # the user insisted on stopping: the write in flight was abandoned and its temp file removed
        finally:
            if getattr(self, "mirror_link", None) is not None:
                self.mirror_link.close()
                self.mirror_link = None
            torch.use_deterministic_algorithms(self._was_deterministic)
            self.run_dir.close()
            self.process_group.close()

    # ---- building ----------------------------------------------------------------------------

    def _build(self, cfg: TrainConfig, explicit: Optional[set[str]]) -> None:
        env, warn = self.env, self.console.warn
        restart = distributed.restart_count(os.environ) if env.launched else 0
        if restart:
            self.console.log(messages.restarted_by_torchrun(restart, distributed.max_restarts(os.environ)))
        self.mirror_link: Optional[MirrorLink] = None  # rank 0's, with --mirror: started once the start point is known
        self.mirror = startup.open_mirror(cfg, env)  # probed before OUT is created
        startup.open_run_dir(cfg, env, self.run_dir, warn)
        found = startup.find_resume(cfg, env, self.run_dir, warn, self.mirror,  # refuses before a download commits
                                    accept=lambda state: startup.plan_start(state, None, cfg, explicit, env.world_size))
        plan = startup.plan_start(found.checkpoint[1] if found.checkpoint else None, found.unsaved_config, cfg,
                                  explicit, env.world_size, unsaved_source=str(self.run_dir.config))
        for change in plan.changes:
            self.console.log(messages.config_change(change, resumed=plan.mode is StartMode.RESUME))
        self.cfg = cfg = plan.cfg
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        parallelism = startup.choose_parallelism(cfg, env.launched, self.dtype)
        if parallelism.warning is not None:
            warn(parallelism.warning)
        # this rank's share, before a size that cannot fit hangs in the allocator
        check_fits(cfg, self.device, env.world_size, parallelism.sharded_model, env.local_world_size)
        self.sharded_model, self.folder_checkpoints = parallelism.sharded_model, parallelism.folder_checkpoints
        self.manager = saving.checkpoint_manager(cfg, self.run_dir, env, self.folder_checkpoints, self._committed,
                                                 lambda: self.stop.abandoning)
        if cfg.deterministic:
            use_deterministic_kernels()  # before cuBLAS first starts; close() restores the global flag
        self.data = startup.load_data(cfg, env, warn)
        startup.claim_mirror(self.mirror, cfg, self.data.fingerprint, env)
        self._build_model(cfg)
        self.saves = saving.StepSaves(self.manager, self.parts, self.run_dir.best, env, self.folder_checkpoints)
        self.decisions = StepDecisions(self.stop, env, self.manager, cfg.time_limit, self.started)
        self.evaluation = Evaluation(cfg, env, self.stop, self.counters, self.decisions,
                                     EvalSamples(cfg.sample_tokens, cfg.sample_prompt, cfg.seed, cfg.vocab_size,
                                                 self.device, warn), self.raw_model, self.sharded_model, self.autocast)

        if found.checkpoint is not None:
            self._resume_from(*found.checkpoint, source=found.source)
        elif plan.mode is StartMode.RERUN:
            self.console.log(messages.training_unsaved_run_again(self.run_dir.checkpoints, self.run_dir.config))
        elif cfg.resume == "auto":
            self.console.log(messages.new_run(self.run_dir.checkpoints))
        self.resumed_from = found.checkpoint[0] if found.checkpoint else None
        if env.is_main:
            self.run_dir.write_config({**cfg.to_dict(), **derived_fields(cfg, env.world_size)})
        if self.mirror is not None:
            resumed = self.counters.step if found.checkpoint is not None else None
            self.mirror_link = MirrorLink.start(self.mirror, self.run_dir.root, lambda text: self.console.warn(text),
                                                cfg.mirror_keep_last or cfg.keep_last, resumed,
                                                found.source is not None or found.mirror_step == resumed,
                                                self.manager.committed_path)

    def _build_model(self, cfg: TrainConfig) -> None:
        """Everything a step needs (see :mod:`nanoresume.building`), kept under the names the loop uses."""
        built = build_step_parts(cfg, self.env, self.device, self.dtype, self.data, self.sharded_model,
                                 warn=lambda text: self.console.warn(text))
        self.raw_model, self.model, self._eval_model = built.raw_model, built.model, built.eval_model
        self.optimizer, self.scheduler, self.scaler = built.optimizer, built.scheduler, built.scaler
        self.sampler, self.val_batches, self.parts = built.sampler, built.val_batches, built.parts
        self.counters = self.parts.counters

    def _resume_from(self, path: Path, state: dict[str, Any], source: Optional[str] = None) -> None:
        """``source``: where the checkpoint was downloaded from (the mirror), named in the resume line."""
        self.parts.load(path, state)
        self.stop.last_committed_step = self.saves.newest = self.counters.step
        self.console.log(messages.resumed(source or path, self.counters.step))
        if not self.env.is_main:
            return
        self.manager.adopt(path, self.counters.step, self.console.warn)  # newer checkpoints are set aside

    def _committed(self, step: int, path: Path) -> None:
        """A step checkpoint was committed locally (on the writer thread in background mode)."""
        self.stop.last_committed_step = step
        if self.mirror_link is not None:
            self.mirror_link.committed(step, path)  # returns at once: training never waits for the network

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The full training state in the file layout (see :meth:`TrainingParts.state_dict`)."""
        return self.parts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state in the file layout (every rank passes all of it; under FSDP each keeps its shards)."""
        self.parts.load_state_dict(state)

    # ---- one step, one evaluation ------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.sharded_model:  # FSDP2 casts through its own policy
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss over all ranks, grad norm).

        Also takes this step's collective decisions (:meth:`StepDecisions.vote`) before the weights change.
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
        votes = self.decisions.vote(total_loss / self.cfg.grad_accum, grad_norm)
        if votes.any_nonfinite_loss:
            raise NonFiniteLossError(messages.nonfinite_loss(votes.loss, self.counters.step + 1,
                                                             self.saves.newest))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return votes.loss, votes.grad_norm

    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed validation batches; None if a stop request arrived during it
        (see :func:`~nanoresume.evaluating.validation_loss`)."""
        return validation_loss(self._eval_model, self.data.val, self.val_batches, self.cfg.block_size, self.device,
                               self.env, self.stop, self.autocast, self.sharded_model)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until ``max_steps`` or a stop request; always save before returning.

        With a library stop flag (the default), a user who insists (a second Ctrl-C) gets a
        :class:`KeyboardInterrupt` naming the last committed step instead of the result, once the
        save in flight is committed (a third: abandoned) and everything is closed.
        """
        cfg, counters = self.cfg, self.counters
        result = RunResult(step=counters.step, stop_reason=None, exit_code=0)
        self.console = Console(cfg.max_steps, counters.step, show_bar=wants_bar(cfg.progress),
                               log_interval=cfg.log_interval, started=self.started, quiet=not self.env.is_main)
        if not self.stop.can_install():
            self.console.warn(messages.not_main_thread())
        try:
            self._run(result)
        except (KeyboardInterrupt, WriteCancelled):
            if self.stop.forced_exit is None and self.stop.forced:  # ours: say it again, now that all is closed
                raise self.stop.interrupted(ending.continue_hint(self.continue_in, self.stop)) from None
            raise
        self.stop.raise_if_forced(ending.continue_hint(self.continue_in, self.stop))
        return result

    def _run(self, result: RunResult) -> None:
        # Handlers stay installed through teardown, where a signal is a forced stop.
        with self.stop.installed(), contextlib.ExitStack() as cleanup:  # every close runs, even if one fails
            cleanup.callback(self.close)
            cleanup.callback(self.console.close)
            metrics = Metrics(self.run_dir.tensorboard, self.run_dir.metrics, self.console.warn, self.on_metrics,
                              enabled=self.env.is_main)  # creates no file before start()
            cleanup.callback(metrics.close)
            cleanup.callback(self.stop.tear_down)  # runs first: nothing left to save
            self.console.log(self._start_line())
            first_step = self.counters.step
            end = ending.Ending(self.cfg, self.env, self.stop, self.manager, self.run_dir, self.counters,
                                self.console.log, ending.Origin(self.continue_in, self.command, self._launcher),
                                self.started, self.mirror_link, self.folder_checkpoints)
            if self._outcome() is FINISHED:
                end.nothing_to_do(result, first_step)
                return
            steps = StepLog(metrics, self.console, self.decisions, self.cfg.tokens_per_step(self.env.world_size),
                            self.cfg.grad_accum, self.cfg.batch_size)
            steps.start(self.counters.step, self.resumed_from is not None, self.cfg.to_dict())
            try:
                end.finish(self._loop(steps), result)
            except Exception as e:  # DDP's and FSDP's own collectives fail unguarded: say so before the teardown
                lost = distributed.lost_peer_error(e)
                if lost is None:
                    raise
                raise distributed.report(lost) from None
            end.fill(result, first_step)

    def _loop(self, steps: StepLog) -> Outcome:
        """Train step by step while the outcome is CONTINUE; each step ends with its save, if due."""
        cfg, counters = self.cfg, self.counters
        evaluated = self.evaluation.due()  # step 0 of a new run, or one a stop cut short before the restart
        if evaluated:
            self._evaluate_and_log(steps)
        # The step resumed from is saved already; after its evaluation, best.pt may not be.
        outcome = self._end_of_step(time_due=False, save=evaluated)
        while outcome is CONTINUE:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the step's own: train_step moves the schedule on
            loss, grad_norm = self.train_step()  # also takes this step's collective decisions
            seconds = time.perf_counter() - started
            counters.step += 1
            counters.tokens_seen += cfg.tokens_per_step(self.env.world_size)
            steps.record(counters.step, loss, lr, grad_norm, seconds)
            if self.on_step is not None:
                self.on_step(self, counters.step, loss)
            if self.evaluation.due():
                self._evaluate_and_log(steps)
            outcome = self._end_of_step(time_due=self.decisions.votes.save_time_due)
        return outcome

    def _end_of_step(self, time_due: bool, save: bool = True) -> Outcome:
        """What follows the step just taken, and its save: when due (and ``save``), always when it is the
        last (a stop before the first step saves too). A stop that arrives during a save that was not
        forced ends the run at this step, saved, rather than after one more."""
        outcome = self._outcome()
        if save or outcome is not CONTINUE:
            self.saves.save_if_due(self.counters.step, force=outcome is not CONTINUE, time_due=time_due)
        if outcome is CONTINUE:
            outcome = self._outcome()
            if outcome is not CONTINUE:
                self.saves.save_if_due(self.counters.step, force=True)  # a no-op when this step is saved already
        return outcome

    def _outcome(self) -> Outcome:
        """What follows the step just taken: the one place a stop is decided."""
        return self.decisions.outcome(self.counters.step, self.cfg.max_steps, self.evaluation.due())

    def _evaluate_and_log(self, steps: StepLog) -> None:
        lag = self.mirror_link.uploader.lag if self.mirror_link is not None else None
        best = self.evaluation.run(self.evaluate, steps.metrics, steps.window, self.console.log, lag)
        if best is not None:
            self.saves.pending_best = best

    def _start_line(self) -> str:
        cfg, world = self.cfg, self.env.world_size
        return messages.start(self.counters.step, cfg.max_steps, self.device.type,
                              str(self.dtype).removeprefix("torch."), self.raw_model.num_parameters(),
                              cfg.tokens_per_step(world), world, cfg.batch_size, cfg.grad_accum,
                              cfg.global_batch(world), self.sharded_model, self.data.describe())
