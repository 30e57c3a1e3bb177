"""Shared set-up for the benchmarks: a Trainer on a small built-in text, without a CLI."""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import socket
import statistics
import tempfile
import sys
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


def launch_command(nproc: int, script_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start ``script_args`` (a script and its flags) as ``nproc`` ranks:
    ``torchrun --standalone`` for more than one; for one, the process torchrun's only worker would be
    (rank 0 of 1, its own store on a free port), without torchrun's own process and its torch import."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *script_args], env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [sys.executable, *script_args], env


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (Linux's VmHWM). Not
    ``ru_maxrss``: that one carries over the RSS of the process it was forked from (a big test runner,
    torchrun's launcher), so a small worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # where there is no /proc: kB on Linux
