"""The periodic evaluation: the mean loss over fixed validation batches, its line and metrics, a text
sample, and best.pt's weights when the loss improved on the best so far.

The trainer asks :meth:`Evaluation.due` after each step and, when due, :meth:`Evaluation.run` with its
own ``evaluate`` (a method tools may wrap); the weights it returns go into that step's save.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from . import distributed, messages, parallel, schema
from .config import TrainConfig
from .console import TrainWindow
from .data import windows
from .distributed import DistributedEnv
from .metrics import Metrics
from .samples import EvalSamples
from .signals import StopFlag
from .stopping import StepDecisions
from .training_state import Counters


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, batches: Sequence[Any], block_size: int,
                    device: torch.device, env: DistributedEnv, stop: StopFlag, autocast: Callable[[], Any],
                    sharded_model: bool) -> Optional[float]:
    """Mean loss over the fixed validation ``batches``; None if a stop request arrived during it.

    A stop requested before it started does not cut it short: an evaluation that is due is
    part of the step, and skipping it would change best.pt and the checkpoint written at the
    stop. Under torchrun the batches are shared out between ranks, and an evaluation is never
    cut short (the ranks would have to agree on it batch by batch).
    """
    stop_already_requested = stop.is_set()
    rank, world, count = env.rank, env.world_size, len(batches)
    mine = list(range(rank, count, world))
    if sharded_model:  # each forward gathers weights with every rank: all must run as many
        mine += [-1] * (-(-count // world) - len(mine))  # (-1: a repeat whose loss counts for nothing)
    model.eval()
    try:
        losses = torch.zeros(count, dtype=torch.float64, device=device)
        for i in mine:
            if world == 1 and stop.is_set() and not stop_already_requested:
                return None
            x, y = (t.to(device) for t in windows(tokens, batches[max(i, 0)], block_size))
            with autocast():
                _, loss = model(x, y)
            if i >= 0:
                losses[i] = loss.double()
        # Each batch's loss comes from exactly one rank; the sum over ranks just collects them.
        per_batch = distributed.all_sum(losses).tolist()
        return sum(per_batch) / len(per_batch)
    finally:
        model.train()


class Evaluation:
    """When an evaluation is due, and what follows one: its line, metrics, sample and best weights."""

    def __init__(self, cfg: TrainConfig, env: DistributedEnv, stop: StopFlag, counters: Counters,
                 decisions: StepDecisions, samples: EvalSamples, raw_model: Any, sharded_model: bool,
                 autocast: Callable[[], Any]) -> None:
        self.cfg, self.env, self.stop, self.counters, self.decisions = cfg, env, stop, counters, decisions
        self.samples, self.raw_model, self.sharded_model, self.autocast = samples, raw_model, sharded_model, autocast

    def due(self) -> bool:
        """At every ``eval_interval`` and at ``max_steps``, unless this step was evaluated already."""
        step = self.counters.step
        due = step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps
        return due and self.counters.evaluated_step != step

    def run(self, evaluate: Callable[[], Optional[float]], metrics: Metrics, window: TrainWindow,
            log: Callable[[str], None], mirror_lag: Optional[Callable[[], tuple[int, float]]]
            ) -> Optional[dict[str, Any]]:
        """Evaluate this step and report it; returns best.pt's state when the loss improved (rank 0),
        else None. An evaluation cut short by a stop request reports nothing and never touches best.pt."""
        train_loss, tokens_per_second = window.summary()
        started = time.perf_counter()
        val_loss = evaluate()
        self.decisions.last_eval_seconds = time.perf_counter() - started
        if val_loss is None:
            return None
        counters, step = self.counters, self.counters.step
        counters.evaluated_step = step
        ppl = math.exp(min(val_loss, 50.0))
        metrics.log(step, {"val/loss": val_loss, "val/perplexity": ppl})
        line = messages.evaluation(step, train_loss, val_loss, ppl, tokens_per_second)
        if mirror_lag is not None:
            lag_steps, lag_seconds = mirror_lag()
            metrics.log(step, {"mirror/lag_steps": float(lag_steps), "mirror/lag_seconds": lag_seconds})
            line += messages.mirror_lag(lag_steps, lag_seconds)
        log(line)
        cancel = self.stop.is_set if self.env.world_size == 1 else None  # a stop waits for no sample (one process)
        self.decisions.last_eval_seconds += self.samples.show(step, self.raw_model, self.autocast, log, metrics,
                                                              cancel)
        window.reset()
        if not val_loss < counters.best_val_loss:  # (a NaN never improves it)
            return None
        counters.best_val_loss = val_loss
        weights = parallel.full_weights(self.raw_model, self.sharded_model)  # under FSDP a collective
        if not self.env.is_main:
            return None
        return schema.weights_state(weights, dataclasses.asdict(self.cfg.model_config()), step,
                                    counters.tokens_seen, val_loss)
