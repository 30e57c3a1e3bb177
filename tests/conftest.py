"""Shared fixtures: a tiny text corpus, a tiny config, and a runner for scripts/train.py."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

# One compute thread, set before torch is imported (here and in every subprocess, which
# inherits the environment): on a busy 2-core machine two threads make tiny models ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from nanoresume.config import TrainConfig, resolve_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "scripts" / "train.py"

# Small enough that a step takes milliseconds on a 2-core CPU, big enough to learn something.
TINY_FLAGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, dropout=0.1,
                  eval_iters=2, warmup_steps=5, lr=3e-3)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 KB of real text (two stdlib modules), fixed across runs."""
    import argparse
    import json

    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(Path(argparse.__file__).read_text() + Path(json.__file__).read_text())
    return path


@pytest.fixture
def make_config(tiny_text: Path, tmp_path: Path) -> Callable[..., TrainConfig]:
    """``make_config(max_steps=20, ...)``: a resolved tiny config writing under tmp_path/out."""

    def make(**overrides: Any) -> TrainConfig:
        values = dict(TINY_FLAGS, data=str(tiny_text), out_dir=str(tmp_path / "out"),
                      cache_dir=str(tmp_path / "cache"), max_steps=20, eval_interval=10, progress=False)
        values.update(overrides)
        return resolve_config(TrainConfig(**values))

    return make


def cli_flags(cfg_values: dict[str, Any]) -> list[str]:
    """Command-line flags for a dict of config values (booleans as --x / --no-x)."""
    args = []
    for name, value in cfg_values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture
def tiny_cli_args(tiny_text: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """``tiny_cli_args(max_steps=20)``: flags for scripts/train.py on the tiny config."""

    def make(**overrides: Any) -> list[str]:
        values = dict(TINY_FLAGS, data=str(tiny_text), out_dir=str(tmp_path / "out"),
                      cache_dir=str(tmp_path / "cache"), max_steps=20, eval_interval=10, progress=False)
        values.update(overrides)
        return cli_flags(values)

    return make


def run_train(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run scripts/train.py in a real subprocess and capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kwargs.pop("env", {}))
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)


def _assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Same nested structure; every tensor equal bit for bit (dtype and shape included)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} of {len(a)} vs {b!r:.80}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def assert_same_state() -> Callable[..., None]:
    """``assert_same_state(a, b)``: nested dicts/lists equal, tensors compared with torch.equal."""
    return _assert_same_state
