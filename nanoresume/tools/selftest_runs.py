"""What the self-test runs (its scenarios: stops at fractions of a run) and how it reads a run's progress.

Shared by :mod:`.selftest`, which runs the scenarios, and :mod:`.selftest_report`, which compares
and explains their outcomes.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..rundir import RunDir


@dataclass(frozen=True)
class Stop:
    """One interruption: ``signal`` once the run has trained ``at`` (a fraction) of its steps."""

    signal: signal.Signals
    at: float
    in_save: bool = False  # wait for the next checkpoint write to begin, and land inside it

    @property
    def graceful(self) -> bool:
        return self.signal != signal.SIGKILL


@dataclass(frozen=True)
class Scenario:
    name: str
    folder: str  # its run's OUT, in the self-test's temporary folder
    stops: tuple[Stop, ...]  # each followed by a start with --resume auto


SCENARIOS = (
    Scenario("straight through", "reference", ()),
    Scenario("SIGTERM", "sigterm", (Stop(signal.SIGTERM, 1 / 3),)),
    Scenario("SIGKILL during a save", "sigkill", (Stop(signal.SIGKILL, 1 / 2, in_save=True),)),
    Scenario("SIGINT, SIGKILL, SIGUSR1", "three-stops",
             (Stop(signal.SIGINT, 1 / 4), Stop(signal.SIGKILL, 1 / 2), Stop(signal.SIGUSR1, 3 / 4))),
)


@dataclass
class Outcome:
    """What happened in one scenario."""

    scenario: Scenario
    out: Path
    stopped: list[str] = field(default_factory=list)  # per stop: the last step trained before it
    resumed: list[int] = field(default_factory=list)  # per stop: the step the next start continued from
    final: Optional[Path] = None  # the last checkpoint of the finished run
    seconds: float = 0.0


# ---- reading a run's progress --------------------------------------------------------------------

def checkpoint_folder(out: Path) -> Path:
    """Where a run keeps its step checkpoints: ``OUT/checkpoints`` (nanoresume's layout) or ``OUT``."""
    checkpoints = RunDir(out).checkpoints
    return checkpoints if checkpoints.is_dir() else out


def read_losses(out: Path) -> Optional[dict[int, Optional[float]]]:
    """Step -> training loss from ``OUT/metrics.jsonl`` (None where it was not finite; a later line
    for a step wins); None if the run writes no such file."""
    path = RunDir(out).metrics
    if not path.exists():
        return None
    losses: dict[int, Optional[float]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if "train/loss" in record:
            losses[int(record["step"])] = record["train/loss"]
    return losses
