"""The stop button of a notebook, pressed any number of times, in a real Jupyter kernel: the kernel never
dies (same PID, the next cell runs), nothing committed is lost, the output says which step is saved,
and running the cell again continues bit-exactly."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from nanoresume import checkpoint
from nanoresume.tools.chaos import final_state_difference
from tests.helpers import TINY_FLAGS
from tests.notebook.kernel import Kernel

pytestmark = pytest.mark.slow

MAX_STEPS = 30
STOPPED = re.compile(r"stopped by SIGINT after step (\d+); saved (\S+)\. Run this cell again "
                     r"\(resume='auto' continues from step (\d+)\)")
INTERRUPTED = re.compile(r"interrupted; last committed checkpoint: (none|step (\d+))")


# Test machinery run in the kernel. ``pause_at(N)``: the next run waits before training step N + 1 until
# a stop was asked for (printing PAUSED), so an interrupt lands at a known step however fast the machine;
# ``pause_at("start-up")`` waits so while the data is being loaded, ``pause_at("evaluation")`` after the
# first batch of the first evaluation.
# ``held_writes(clicks)``: the stop's save (a write that starts once a stop was asked for) is held until
# the user has clicked ``clicks`` times in all, so the later clicks land while it is being written however
# fast or slow the machine writes (it prints HELD as it starts holding); it returns the function that undoes it.
HOOKS = """
import time
import nanoresume, torch
from nanoresume import checkpoint as _checkpoint
from nanoresume.trainer import Trainer as _Trainer

import signal
import nanoresume.startup as _startup
import nanoresume.evaluating as _evaluating

_pause = {}

def _wait_for_a_stop(where):
    if "at" not in _pause or _pause["at"] != where:
        return
    _pause.clear()
    print("PAUSED", flush=True)
    stop = signal.getsignal(signal.SIGINT).__self__  # the StopFlag that nanoresume.train installed
    deadline = time.monotonic() + 240
    while not stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)

def _wrap(owner, name, where):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        _wait_for_a_stop(where(*args))
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

_wrap(_Trainer, "train_step", lambda self: self.counters.step)
_wrap(_startup, "load_data", lambda *args: "start-up")
_windows = {"calls": 0}
def _count_windows(*args):
    _windows["calls"] += 1
    return "evaluation" if _windows["calls"] == 2 else None
_wrap(_evaluating, "windows", _count_windows)

def pause_at(where):
    _pause["at"] = where
    _windows["calls"] = 0

class _HeldWrites(_checkpoint.CheckpointObserver):
    def __init__(self, clicks):
        self.clicks, self.held = clicks, False
    def on_write_progress(self, path, nbytes):
        stop = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
        if stop is None or not stop.is_set():
            return  # not the stop's save
        if stop.signals_received + stop.insisted < self.clicks and not self.held:
            self.held = True
            print("HELD", flush=True)  # the test clicks again only now: the click lands in this write
        deadline = time.monotonic() + 240
        while stop.signals_received + stop.insisted < self.clicks and time.monotonic() < deadline:
            time.sleep(0.01)

def held_writes(clicks):
    return _checkpoint.observe(_HeldWrites(clicks))
"""


@pytest.fixture(scope="module")
def kernel(notebook_kernel, tmp_path_factory, tiny_text):
    """The session's kernel (tests/notebook/conftest.py), with HOOKS imported and ``S``, the tiny settings.
    HOOKS do nothing until ``pause_at`` or ``held_writes`` asks them to, so later tests in the kernel run as
    in a fresh one."""
    settings = dict(TINY_FLAGS, data=str(tiny_text), cache_dir=str(tmp_path_factory.mktemp("cache")),
                    eval_interval=10, log_interval=1, progress=False)
    setup = notebook_kernel.run(f"{HOOKS}\nS = {settings!r}")
    assert setup.error is None, setup.output
    return notebook_kernel


def train(out: Path, **overrides) -> str:
    """A cell that trains the tiny run in ``out`` (``overrides`` on top of ``S``) and prints its result."""
    settings = {"max_steps": MAX_STEPS, **overrides}
    return (f"r = nanoresume.train(out_dir={str(out)!r}, **{{**S, **{settings!r}}})\n"
            f"print('RESULT', r.stop_reason, r.step, r.last_checkpoint)")


def assert_alive(kernel: Kernel) -> None:
    assert kernel.pid() == kernel.first_pid  # the same kernel, and it runs the next cell


def saved_step(output: str) -> int:
    """The step the output names as saved: the stop line, or a KeyboardInterrupt's message."""
    stopped = STOPPED.search(output)
    if stopped:
        assert stopped.group(1) == stopped.group(3), output
        return int(stopped.group(1))
    interrupted = INTERRUPTED.search(output)
    assert interrupted and interrupted.group(2), output
    return int(interrupted.group(2))


def test_one_interrupt_saves_returns_sigint_and_running_the_cell_again_continues_bit_exactly(kernel, tmp_path):
    out = tmp_path / "out"
    cell = kernel.start("pause_at(3)\n" + train(out))
    cell.wait_until("PAUSED")
    kernel.interrupt()
    cell.wait()
    assert cell.error is None, cell.output
    result = re.search(r"RESULT SIGINT (\d+) (\S+)", cell.stdout)
    assert result, cell.output
    step = int(result.group(1))
    assert step == 4 and saved_step(cell.output) == step  # the step in progress ends, then the stop
    assert checkpoint.load_checkpoint(Path(result.group(2)))["step"] == step

    again = kernel.run(train(out))
    assert again.error is None and f"RESULT None {MAX_STEPS} " in again.stdout, again.output
    assert f"resumed from {result.group(2)} at step {step}" in again.stdout
    reference = kernel.run(train(tmp_path / "reference"))
    assert reference.error is None, reference.output
    final = checkpoint.step_path(out / "checkpoints", MAX_STEPS)
    assert final_state_difference(final, checkpoint.step_path(tmp_path / "reference" / "checkpoints",
                                                              MAX_STEPS)) is None
    assert_alive(kernel)


@pytest.mark.parametrize("gaps", [(0.05,), (0.5,), (0.3, 0.3)], ids=["twice-0.05s", "twice-0.5s", "three-times"])
def test_pressing_stop_again_never_kills_the_kernel_nor_loses_what_was_committed(kernel, tmp_path, gaps):
    out = tmp_path / "out"
    clicks = 1 if gaps == (0.05,) else 1 + len(gaps)  # a click within DUPLICATE_WINDOW is the same click
    assert kernel.run(f"_fast_again = held_writes({clicks})").error is None
    try:
        cell = kernel.start("pause_at(7)\n" + train(out, ckpt_interval=5))
        cell.wait_until("PAUSED")
        first = checkpoint.step_path(out / "checkpoints", 5)
        deadline = time.monotonic() + 240
        while not first.exists():  # committed (a write in progress has another name)
            assert time.monotonic() < deadline and not cell.done, cell.output
            kernel._pump(0.05)
        kernel.interrupt()
        if clicks > 1:
            cell.wait_until("HELD")  # the stop's save has started, however long the step before it took
        for gap in gaps:
            time.sleep(gap)  # the user clicking again
            kernel.interrupt()
        cell.wait()
    finally:
        assert kernel.run("_fast_again()").error is None
    assert_alive(kernel)
    step = saved_step(cell.output)
    stopped = STOPPED.search(cell.output)
    if gaps == (0.05,):  # within DUPLICATE_WINDOW: one click, echoed; the cell returns the result
        assert cell.error is None and stopped and f"RESULT SIGINT {step} " in cell.stdout, cell.output
    elif len(gaps) == 1:  # insisting: the stop's save is committed, then KeyboardInterrupt names it
        assert cell.error[0] == "KeyboardInterrupt" and stopped and int(stopped.group(1)) == step, cell.output
        assert f"Run this cell again (resume='auto' continues from step {step})" in cell.error[1]
        assert "interrupted again: waiting for the checkpoint of step 8 to be written (last committed: step 5)" \
            in cell.output
    else:  # a third time: the stop's save (step 8) is abandoned at once; the one before stays
        assert cell.error[0] == "KeyboardInterrupt" and step == 5, cell.output
    folder = out / "checkpoints"
    assert checkpoint.load_checkpoint(checkpoint.step_path(folder, step))["step"] == step
    assert not [p.name for p in folder.iterdir() if ".tmp." in p.name]  # an abandoned write leaves no temp file
    again = kernel.run(train(out, max_steps=step + 2, ckpt_interval=5))
    assert again.error is None and f"at step {step}" in again.stdout, again.output


def test_an_interrupt_during_start_up_or_the_first_evaluation_leaves_the_kernel_alive(kernel, tmp_path):
    # during start-up: while the data is loaded
    cell = kernel.start("pause_at('start-up')\n" + train(tmp_path / "start-up"))
    cell.wait_until("PAUSED")
    kernel.interrupt()
    cell.wait()
    assert "RESULT SIGINT 0 " in cell.stdout, cell.output  # stopped before the first step, and saved it
    assert_alive(kernel)

    # during the evaluation at step 0, after its first batch
    cell = kernel.start("pause_at('evaluation')\n" + train(tmp_path / "eval", eval_iters=4))
    cell.wait_until("PAUSED")
    kernel.interrupt()
    cell.wait()
    assert cell.error is None, cell.output
    assert "RESULT SIGINT 0 " in cell.stdout, cell.output
    assert "step      0 |" not in cell.stdout  # the cut-short evaluation reported nothing
    assert_alive(kernel)
