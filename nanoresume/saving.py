"""Each step's save: the step checkpoint when it is due (or forced), and best.pt when this step's
evaluation improved it, as one save, staged now, committed now or in the background.

Every rank takes the same decision. A file: each rank hands rank 0 its RNG streams (and under
FSDP its shards), and rank 0 alone writes. A folder: every rank writes its own part. In
synchronous mode every rank waits for the commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from . import distributed
from .checkpoint import CheckpointManager
from .checkpoint.observe import CancelWhen
from .config import TrainConfig
from .distributed import DistributedEnv
from .rundir import RunDir
from .training_parts import TrainingParts


def checkpoint_manager(cfg: TrainConfig, run_dir: RunDir, env: DistributedEnv, folder_checkpoints: bool,
                       on_commit: Callable[[int, Path], None], abandoning: Callable[[], bool]) -> CheckpointManager:
    """The run's save policy, from its settings: the interval, the minutes, how many to keep, in the
    background or not; ``abandoning`` cancels a write in flight (the user insisted on stopping)."""
    return CheckpointManager(
        run_dir.checkpoints, cfg.effective_ckpt_interval, cfg.keep_last, background=cfg.async_save,
        every_seconds=cfg.ckpt_minutes * 60 if cfg.ckpt_minutes is not None else None,
        # a folder's writes coordinate over a group of their own: they may run on the writer thread
        group=distributed.new_group() if folder_checkpoints else None,
        token=str(distributed.broadcast_object(os.getpid())), coordinator=env.is_main,
        on_commit=on_commit, observer=CancelWhen(abandoning), advice=run_dir.checkpoint_advice)


class StepSaves:
    """The save at the end of each step; ``newest`` is the step a resume would restart at (staged or
    committed), ``pending_best`` best.pt's state waiting for this step's save (rank 0)."""

    def __init__(self, manager: CheckpointManager, parts: TrainingParts, best: Path, env: DistributedEnv,
                 folder_checkpoints: bool) -> None:
        self.manager, self.parts, self.best, self.env = manager, parts, best, env
        self.folder_checkpoints = folder_checkpoints
        self.newest: Optional[int] = None
        self.pending_best: Optional[dict[str, Any]] = None

    def save_if_due(self, step: int, force: bool, time_due: bool = False) -> None:
        """Save ``step`` when due (``force``: always; step 0 only then), with best.pt if it is pending."""
        manager = self.manager
        due = (step > 0 or force) and manager.is_due(step, force, time_due=time_due)
        state = self.parts.checkpoint(self.folder_checkpoints) if due else None
        best = [(self.best, self.pending_best)] if self.pending_best is not None else []
        self.pending_best = None
        if state is not None:
            self.newest = step
        if self.folder_checkpoints and state is not None:
            manager.save(step, state, also=best, sharded=True)
        elif self.env.is_main and (state is not None or best):
            manager.save(step, state, also=best)
        elif state is not None:
            manager.mark_staged(step)  # the decision is shared; the file is rank 0's
        if due and not manager.background:
            distributed.barrier("the wait for a checkpoint commit")
