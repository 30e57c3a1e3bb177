"""How a run ends: which last line (finished; stopped from a shell, under torchrun, in Python) and the
mirror's bounded wait at the end, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nanoresume import messages
from nanoresume.ending import Origin, last_line
from nanoresume.mirror.link import MirrorLink
from nanoresume.signals import StopFlag
from nanoresume.stopping import FINISHED, Outcome
from nanoresume.training_state import Counters

SAVED = Path("out/checkpoints/step_00000007.pt")
BEST = Path("out/best.pt")
STOP = Outcome("stop", "SIGTERM", 143)


def line(outcome: Outcome, origin: Origin, launched: bool = False) -> str:
    stop = StopFlag()
    stop.last_committed_step = 7
    return last_line(outcome, Counters(step=7, tokens_seen=70), SAVED, stop, origin, "out", launched, BEST, 3.0)


def test_a_stop_from_the_shell_names_the_command_that_continues_it():
    origin = Origin("shell", ["nanoresume", "train"], None)
    assert line(STOP, origin) == messages.stopped("SIGTERM", 7, SAVED, ["nanoresume", "train"], "out")


def test_a_stop_under_torchrun_names_the_launcher_s_command_or_says_to_rerun_it():
    unknown = line(STOP, Origin("shell", ["nanoresume", "train"], None), launched=True)
    assert unknown == messages.stopped_under_torchrun("SIGTERM", 7, SAVED, None)
    known = line(STOP, Origin("shell", ["nanoresume", "train"], ["torchrun", "train.py"]), launched=True)
    assert "Continue with: torchrun train.py" in known and "--resume auto" in known


def test_a_stop_in_a_notebook_says_to_run_the_cell_again_and_a_finished_run_says_finished():
    notebook = line(STOP, Origin("notebook", ["nanoresume", "train"], None))
    assert notebook == messages.stopped_in_python("SIGTERM", 7, SAVED, 7, "notebook")
    assert line(FINISHED, Origin("notebook", [], None)).startswith("finished: 7 steps, 70 tokens")


class FakeUploader:
    def __init__(self) -> None:
        self.waited: Optional[float] = None

    def wait(self, timeout: float) -> Optional[int]:
        self.waited = timeout
        return None

    def summary(self) -> str:
        return "mirrored step 7"


def waited(mirror_wait: float, forced: bool, time_left: Optional[float]) -> Optional[float]:
    uploader = FakeUploader()
    assert MirrorLink(uploader).finish(mirror_wait, forced, time_left) == "mirrored step 7"  # type: ignore[arg-type]
    return uploader.waited


def test_the_end_waits_for_the_mirror_at_most_mirror_wait_never_past_the_time_limit_nor_when_forced():
    assert waited(30.0, False, None) == 30.0
    assert waited(30.0, False, 5.0) == 5.0
    assert waited(30.0, False, -2.0) == 0.0  # the time limit has passed
    assert waited(30.0, True, None) == 0.0  # the user insists: no waiting for the network
