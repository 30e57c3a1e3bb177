"""What each training step leaves behind for the user: its metrics, the console's line or bar, the
losses the next evaluation line averages, and the warning for steps too slow for a stop to wait on."""

from __future__ import annotations

from .console import Console, TrainWindow
from .metrics import Metrics
from .slowsteps import SlowStepWatch
from .stopping import StepDecisions


class StepLog:
    """Records each step of one :meth:`Trainer.run` (made once the console and metrics are open)."""

    def __init__(self, metrics: Metrics, window: TrainWindow, console: Console, decisions: StepDecisions,
                 tokens_per_step: int, slow_steps: SlowStepWatch) -> None:
        self.metrics, self.window, self.console, self.decisions = metrics, window, console, decisions
        self.tokens_per_step, self.slow_steps = tokens_per_step, slow_steps

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
