"""The output folder of one run: its layout, a lock against two runs sharing it, and its small files.

Layout::

    OUT/config.json           resolved config of the latest start (plain JSON)
    OUT/best.pt (+ .sha256)   inference weights of the best validation loss so far
    OUT/checkpoints/          step_00000500.pt (+ .sha256) or step_00000500/ (a folder of shards),
                              newest --keep-last of them
    OUT/tb/                   TensorBoard event files
    OUT/metrics.jsonl         one JSON object per training step and per evaluation
    OUT/exit_code             how the last start ended, when it ended by itself (for job scripts)
    OUT/.lock                 held (flock) by the run training here

This module is the one place that spells these names; everything else asks a :class:`RunDir`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from . import checkpoint
from .atomic import write_file_atomically
from .errors import (REMEDY_FREE_SPACE, REMEDY_MOVE_OBSTACLE, REMEDY_NONE_USABLE, REMEDY_RESUME_OR_ELSEWHERE,
                     CheckpointWriteError, ConfigError, UserError)

# The names inside OUT that a mirror of the run repeats (see nanoresume.mirror.remote).
CHECKPOINTS = "checkpoints"
BEST = "best.pt"
CONFIG = "config.json"


class RunDir:
    """``RunDir(out)``: the paths of one run's folder (``.checkpoints``, ``.best``, ``.config``, ``.metrics``,
    ``.tensorboard``, ``.exit_code``, ``.lock_file``); :meth:`open` and :meth:`close` for the run that trains there."""

    # How the training command words the fixes the checkpoint package suggests (see nanoresume.errors).
    checkpoint_advice = {
        REMEDY_FREE_SPACE: "free some space or choose another --out-dir, then rerun with --resume auto. "
                           "Earlier checkpoints are intact",
        REMEDY_MOVE_OBSTACLE: "move it out of {folder}, then rerun with --resume auto",
        REMEDY_RESUME_OR_ELSEWHERE: "pass --resume auto to continue that run, or choose another --out-dir",
        REMEDY_NONE_USABLE: "see why with: nanoresume ckpt verify {folder}. Move them away to "
                            "start over, or choose another --out-dir",
    }

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / CHECKPOINTS
        self.tensorboard = self.root / "tb"
        self.best = self.root / BEST
        self.config = self.root / CONFIG
        self.metrics = self.root / "metrics.jsonl"
        self.exit_code = self.root / "exit_code"
        self.lock_file = self.root / ".lock"
        self._lock_fd: Optional[int] = None

    def open(self, warn: Callable[[str], None]) -> None:
        """Create the folders, prove they are writable, take the lock, clear leftovers of a crash.

        Raises :class:`UserError` before any training if the folder cannot be used.
        """
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.checkpoints / f".write-test.{os.getpid()}"
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise UserError(f"--out-dir {self.root} is not writable ({e.strerror or e}); "
                            f"choose a folder you can write to") from None
        self._lock()
        self.exit_code.unlink(missing_ok=True)  # from an earlier start; a crash of this one leaves none
        leftovers = checkpoint.remove_leftovers(self.root, owned=(self.best.name, self.config.name)) + \
            checkpoint.CheckpointDir(self.checkpoints).remove_leftovers()
        for leftover in leftovers:
            warn(f"removed {leftover}, left by an interrupted write")

    def _lock(self) -> None:
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"another training run is using --out-dir {self.root}; wait for it to end "
                                f"or choose another --out-dir") from None
            raise
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def read_config(self) -> Optional[dict[str, Any]]:
        """The config.json of the latest start, or None if there is none."""
        try:
            text = self.config.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {self.config} ({getattr(e, 'strerror', None) or e}); fix or "
                              f"remove it, or choose another --out-dir") from None
        try:
            config = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{self.config} is not valid JSON ({e}); fix or remove it, "
                              f"or choose another --out-dir") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{self.config} holds no config object; fix or remove it, or choose another --out-dir")
        return config

    def write_exit_code(self, code: int) -> None:
        """Record how this start ended (0 finished, 75 time limit, 128+N a signal), for a job script
        under torchrun, which hides its workers' exit codes behind its own 1. Best effort: a full
        disk here changes nothing about the run."""
        try:
            write_file_atomically(self.exit_code, f"{code}\n".encode())
        except OSError:
            pass

    def write_config(self, config: dict[str, Any]) -> None:
        path = self.config
        try:
            write_file_atomically(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        except OSError as e:
            raise CheckpointWriteError(f"could not write {path}: {e.strerror or e}",
                                       "free some space or choose another --out-dir") from None
