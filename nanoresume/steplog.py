"""What each training step leaves behind for the user: its metrics, the console's line or bar, the
losses the next evaluation line averages, and the warning for steps too slow for a stop to wait on."""

from __future__ import annotations

from typing import Any

from . import messages

from .console import Console, TrainWindow
from .metrics import Metrics
from .slowsteps import SlowStepWatch
from .stopping import StepDecisions


class StepLog:
    """Records each step of one :meth:`Trainer.run` (made once the console and metrics are open)."""

    def __init__(self, metrics: Metrics, console: Console, decisions: StepDecisions, tokens_per_step: int,
                 grad_accum: int, batch_size: int) -> None:
        self.metrics, self.console, self.decisions, self.tokens_per_step = metrics, console, decisions, tokens_per_step
        self.window = TrainWindow()  # the losses since the last evaluation line
        self.slow_steps = SlowStepWatch(grad_accum, batch_size)  # its advice names the settings that matter

    def start(self, step: int, resumed: bool, config: dict[str, Any]) -> None:
        """Log from the first step this start trains: a resume from step R continues at R + 1, a new
        run (or one killed before its first checkpoint) at 0, dropping what earlier starts logged there."""
        last_lost = self.metrics.start(step + 1 if resumed else 0, config)
        lost = messages.lost_steps(step + 1, last_lost)
        if lost is not None:
            self.console.log(lost)

    def record(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        tokens = self.tokens_per_step
        self.window.add(loss, tokens)
        self.decisions.slowest_step = max(self.decisions.slowest_step, seconds)
        self.metrics.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                "train/tokens_per_s": tokens / seconds})
        self.console.advance(step, loss, lr, tokens, seconds)
        warning = self.slow_steps.observe(step, seconds)
        if warning is not None:
            self.console.warn(warning)
