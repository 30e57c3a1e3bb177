"""Helpers the tests share: paths, the tiny model's flags, running scripts, training in pieces.

Fixtures live in ``tests/conftest.py``; plain functions live here and are imported
(``from tests.helpers import run_train``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from nanoresume.config import command_line_flags as cli_flags  # noqa: F401 (tests import it from here)

if TYPE_CHECKING:
    from nanoresume.config import TrainConfig
    from nanoresume.trainer import RunResult, Trainer

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "scripts" / "train.py"

# Small enough that a step takes milliseconds on a 2-core CPU, big enough to learn something.
# No text samples at evaluations: a 64-token sample costs ~15 of these steps (tests/unit/test_samples.py
# turns them on).
TINY_FLAGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, dropout=0.1,
                  eval_iters=2, warmup_steps=5, lr=3e-3, sample_tokens=0)

# The six type-confused checkpoints the outside battery found, each with a matching checksum,
# and what the one-line problem about each must name (the key at fault).
TYPE_CONFUSED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "format_version-is-a-string": (lambda s: s.update(format_version="1"), "'format_version'"),
    "kind-is-a-list": (lambda s: s.update(kind=["train"]), "'kind'"),
    "config-field-of-the-wrong-type": (lambda s: s["config"].update(n_layer="2"), "config.n_layer"),
    "ranks-empty": (lambda s: s.update(ranks=[]), "'ranks'"),
    "data-without-fingerprint": (lambda s: s["data"].pop("fingerprint"), "data.fingerprint"),
    "optimizer-without-param-groups": (lambda s: s["optimizer"].update(param_groups=[]), "optimizer.param_groups"),
}


_LAUNCHED: list[tuple[subprocess.Popen, bytes]] = []  # each launch and the environment entry that marks its tree
_MARK = "NANORESUME_TEST_LAUNCH"


def launch_tree(command: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen ``command`` with a mark in its environment that every process it starts inherits, so that
    :func:`kill_launched_trees` finds them all: torchrun puts its workers in sessions of their own, and
    they outlive a killed torchrun. A test that fails on a hang must not leave workers behind, blocked
    in a collective and holding memory, for the rest of the suite."""
    mark = f"{_MARK}={os.getpid()}-{len(_LAUNCHED)}-{time.monotonic_ns()}"
    env = dict(kwargs.pop("env", None) or os.environ)
    env[_MARK] = mark.split("=", 1)[1]
    process = subprocess.Popen(command, env=env, **kwargs)
    _LAUNCHED.append((process, mark.encode()))
    return process


def run_tree(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` (text, output captured) through :func:`launch_tree`; on a timeout the
    whole tree is killed before ``TimeoutExpired`` is raised."""
    process = launch_tree(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launched_trees()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill_launched_trees() -> None:
    """SIGKILL every process still running that a :func:`launch_tree` launch started, at any depth."""
    while _LAUNCHED:
        process, mark = _LAUNCHED.pop()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if mark in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def run_script(script: Path, *args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run one of scripts/*.py in a real subprocess and capture its output as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kwargs.pop("env", {}))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def run_train(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run scripts/train.py in a real subprocess and capture its output."""
    return run_script(TRAIN_SCRIPT, *args, timeout=timeout, **kwargs)


def run_main(main: Callable[[list[str]], int], argv: list[str], capsys: Any) -> subprocess.CompletedProcess:
    """Call a tool's ``main(argv)`` in this process, as its script would run it in a subprocess: the exit
    code (argparse's ``SystemExit`` included) and what it printed (through pytest's ``capsys``)."""
    capsys.readouterr()  # only this call's output
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The process failed with ``code`` and exactly one stderr line holding every needle; no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def flip_a_byte(path: Path) -> None:
    """Corrupt a file in its middle, keeping its size (its checksum then no longer matches)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def stop_after(step: int) -> Callable[[Trainer, int, float], None]:
    """An ``on_step`` hook that requests a stop right after ``step`` (as a signal would; exit code 99)."""

    def hook(trainer: Trainer, current: int, loss: float) -> None:
        if current == step:
            trainer.stop.request("test", 99)

    return hook


class LossRecorder:
    """An ``on_step`` hook that keeps every step's (step, train loss), then calls ``then`` if given."""

    def __init__(self, then: Optional[Callable[[Trainer, int, float], None]] = None) -> None:
        self.losses: list[tuple[int, float]] = []
        self.then = then

    def __call__(self, trainer: Trainer, step: int, loss: float) -> None:
        self.losses.append((step, loss))
        if self.then is not None:
            self.then(trainer, step, loss)


class Recorded:
    """A :class:`RunResult`'s fields, and ``step_losses``: every step's (step, train loss) in order."""

    def __init__(self, result: RunResult, step_losses: list[tuple[int, float]]) -> None:
        self.__dict__.update(vars(result))
        self.step_losses = step_losses


def train(cfg: TrainConfig, stop_at: Optional[int] = None) -> tuple[Trainer, Recorded]:
    """Train ``cfg`` (stopping right after ``stop_at`` if given); returns (trainer, result with step_losses)."""
    from nanoresume.trainer import Trainer

    recorder = LossRecorder(then=stop_after(stop_at) if stop_at is not None else None)
    trainer = Trainer(cfg, on_step=recorder)
    result = Recorded(trainer.run(), recorder.losses)
    if stop_at is not None and stop_at < cfg.max_steps:
        assert (result.step, result.stop_reason, result.exit_code) == (stop_at, "test", 99)
    return trainer, result


def train_in_pieces(cfg: TrainConfig, stops: list[int]) -> tuple[Trainer, list[tuple[int, float]]]:
    """Stop after each step in ``stops`` and resume (--resume auto) until max_steps; all losses."""
    losses: list[tuple[int, float]] = []
    trainer, result = train(cfg, stop_at=stops[0])
    losses += result.step_losses
    for stop_at in stops[1:] + [None]:
        trainer, result = train(dataclasses.replace(cfg, resume="auto"), stop_at=stop_at)
        assert trainer.resumed_from is not None
        losses += result.step_losses
    return trainer, losses


def final_state(trainer: Trainer) -> dict[str, Any]:
    """Everything a run ends with, except the config (out_dir and resume differ by design)."""
    state = trainer.state_dict()
    del state["config"]
    return state


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """An uninterrupted run, trained once per session (the ``reference_run`` fixture) and shared by
    every test that asks for the same flags. Read it, never change it: :meth:`copy_to` gives a test
    an OUT of its own to resume or damage."""

    cfg: TrainConfig
    losses: tuple[tuple[int, float], ...]  # (step, train loss) of every step
    model: dict[str, Any]  # the raw model's state_dict at the end, copied
    optimizer: dict[str, Any]  # the optimizer's state_dict at the end, copied
    state: dict[str, Any]  # final_state() at the end, copied

    @classmethod
    def train(cls, cfg: TrainConfig) -> ReferenceRun:
        trainer, result = train(cfg)
        return cls(cfg, tuple(result.step_losses), copy.deepcopy(trainer.raw_model.state_dict()),
                   copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(final_state(trainer)))

    @property
    def step_losses(self) -> list[tuple[int, float]]:
        """A fresh list, to compare with ``==`` against another run's."""
        return list(self.losses)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    def copy_to(self, out: Path) -> TrainConfig:
        """Copy OUT (file times kept) to ``out``; returns the config pointing there."""
        shutil.copytree(self.out, out)
        return dataclasses.replace(self.cfg, out_dir=str(out))
