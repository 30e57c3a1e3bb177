"""Run as ``python -m tests.integration.held_run [--hold WHERE]... [--signals N | --until-stdout-gone]
[--teardown-mark] TRAIN_ARGS...``:
``scripts/train.py`` with those flags, held at a known point until the test's signal has arrived, so that a
signal lands there however fast or slow the machine (no long run to land it in, no slowed writes).

``WHERE``:

- ``step:N``: before training step N + 1 (the run then stops after step N + 1);
- ``evaluation:N``: in the Nth evaluation of this start (1 is the first), before its first batch;
- ``write:NAME``: in the write of the checkpoint file NAME (``best.pt``, ``step_00000010.pt``), once its
  first bytes are written; a background write holds its own thread, and training goes on.

Each ``--hold`` is one place (give several to hold both a background write and the loop). There it
prints ``HELD WHERE`` on stdout and waits (at most ``HOLD_TIMEOUT`` seconds) until the run's stop
flag has counted N signals (``--signals``, default 1; a forced exit ends the process meanwhile), or with
``--until-stdout-gone`` until the reader of its stdout pipe has closed it (``| head -2``). With a ``write:``
hold, every checkpoint file write prints ``WRITE NAME`` as it starts and ``COMMITTED NAME`` once committed.
``--teardown-mark``: an exit handler prints ``TEARDOWN_MARK`` if the interpreter's own teardown runs.
"""

from __future__ import annotations

import atexit
import runpy
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from nanoresume import checkpoint, evaluating
from nanoresume.trainer import Trainer

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
HOLD_TIMEOUT = 120.0  # seconds; the test's signal comes within a second or two of HELD
TEARDOWN_MARK = "interpreter teardown ran"
_run: dict[str, Any] = {}  # "trainer": the Trainer whose stop flag a hold waits on


def say(text: str) -> None:
    """One line in one write: a reader that closes the pipe once it has seen ``text`` leaves no newline
    behind to fail on."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def hold(where: str, signals: int) -> None:
    """Print HELD, then wait until the run's stop flag has counted ``signals`` signals (0: until stdout
    is gone)."""
    say(f"HELD {where}")
    stop = _run["trainer"].stop
    deadline = time.monotonic() + HOLD_TIMEOUT
    while time.monotonic() < deadline and not (stdout_gone() if signals == 0 else
                                               stop.signals_received + stop.insisted >= signals):
        time.sleep(0.01)


def file_name(path: Path) -> str:
    """``step_00000010.pt`` for the temp file ``.step_00000010.pt.tmp.123`` it is written as."""
    return path.name.lstrip(".").split(".tmp.")[0]


class _HeldWrites(checkpoint.CheckpointObserver):
    def __init__(self, held: Optional[str], signals: int) -> None:
        self.held, self.signals = held, signals
        self.previous: dict[int, int] = {}  # per writing thread: the byte count last reported
        self.lock = threading.Lock()

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        thread = threading.get_ident()
        with self.lock:
            starting = nbytes <= self.previous.get(thread, -1) or thread not in self.previous
            self.previous[thread] = nbytes
        if starting:  # the count starts again with each file
            name = file_name(path)
            say(f"WRITE {name}")
            if name == self.held:
                self.held = None
                hold(f"write:{name}", self.signals)

    def after_commit(self, target: Path) -> None:
        with self.lock:
            self.previous.pop(threading.get_ident(), None)
        say(f"COMMITTED {target.name}")


def install(holds: list[str], signals: int) -> None:
    places = dict(where.partition(":")[::2] for where in holds)  # kind -> at
    assert set(places) <= {"step", "evaluation", "write"}, holds
    run, train_step, evaluate, windows = Trainer.run, Trainer.train_step, Trainer.evaluate, evaluating.windows
    evaluations = [0]

    def recorded_run(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        _run["trainer"] = self
        return run(self, *args, **kwargs)

    def held_step(self: Trainer) -> Any:
        if "step" in places and self.counters.step == int(places["step"]):
            hold(f"step:{places['step']}", signals)
        return train_step(self)

    def counted_evaluate(self: Trainer) -> Any:
        evaluations[0] += 1
        return evaluate(self)

    def held_windows(*args: Any, **kwargs: Any) -> Any:
        if "evaluation" in places and evaluations[0] == int(places["evaluation"]):
            evaluations[0] = -1  # once
            hold(f"evaluation:{places['evaluation']}", signals)
        return windows(*args, **kwargs)

    Trainer.run, Trainer.train_step, Trainer.evaluate = recorded_run, held_step, counted_evaluate
    evaluating.windows = held_windows
    if "write" in places:
        checkpoint.observe(_HeldWrites(places["write"], signals))


def main(argv: list[str]) -> None:
    holds, signals = [], 1
    while argv and argv[0] in ("--hold", "--signals", "--until-stdout-gone", "--teardown-mark"):
        option = argv.pop(0)
        if option == "--teardown-mark":
            atexit.register(say, TEARDOWN_MARK)
        elif option == "--until-stdout-gone":
            signals = 0
        elif option == "--hold":
            holds.append(argv.pop(0))
        else:
            signals = int(argv.pop(0))
    install(holds, signals)
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")  # ends the process as the script does


if __name__ == "__main__":
    main(sys.argv[1:])
