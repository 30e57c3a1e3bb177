"""Shared set-up for the benchmarks: a Trainer on a small built-in text, without a CLI."""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from nanoresume.config import TrainConfig, resolve_config
from nanoresume.trainer import Trainer

DATA = str(Path(argparse.__file__))  # ~100 KB of text every Python has


def scratch_dir(prefix: str) -> Path:
    """A temp folder removed when the process exits: the benchmarks write gigabytes of checkpoints."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def make_trainer(preset: str, device: str, **overrides) -> Trainer:
    work = scratch_dir(f"nanoresume-bench-{preset}-")
    cfg = resolve_config(TrainConfig(preset=preset, device=device, data=DATA, out_dir=str(work / "out"),
                                     cache_dir=str(work / "cache"), progress=False, sample_tokens=0, **overrides))
    return Trainer(cfg)


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
