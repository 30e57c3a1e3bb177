"""Run as ``python -m tests.mirror.held_train MODE MARKER STEP [train flags...]``: ``scripts/train.py``
with those flags, made to pause at a known point so that a test can act on a real process there.

After step STEP, once the mirror holds a checkpoint of the run (the uploader's ``held``), the process
touches MARKER, then by MODE:

- ``hold``: sleeps until it is killed (a test SIGKILLs it: the machine is lost);
- ``sigterm``: sends itself a real SIGTERM, as a preemption would (the run stops after step STEP + 1);
- ``pause``: waits until ``MARKER.go`` exists (the test stops the server meanwhile), then trains on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from nanoresume.tools.cli import exit_now, main
from nanoresume.trainer import Trainer

MODES = ("hold", "sigterm", "pause")


def install(mode: str, marker: Path, at: int) -> None:
    original = Trainer._end_of_step

    def end_of_step(self: Trainer, *args, **kwargs):
        outcome = original(self, *args, **kwargs)
        if self.counters.step == at:
            deadline = time.monotonic() + 60
            while self.mirror_link.uploader.held is None and time.monotonic() < deadline:
                time.sleep(0.02)
            marker.touch()
            if mode == "hold":
                time.sleep(600)
            elif mode == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the run stops after the next step, as it would on a real one
            else:
                go = marker.with_name(marker.name + ".go")
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
        return outcome

    Trainer._end_of_step = end_of_step


if __name__ == "__main__":
    mode, marker, at, *flags = sys.argv[1:]
    assert mode in MODES, mode
    install(mode, Path(marker), int(at))
    exit_now(main(flags))
