"""Real processes, real signals: each stop exits 128+signal, saves its step, and resumes bit-exactly.

Each stop signal has a test of its own place to land (SIGTERM between steps, SIGHUP in an evaluation,
SIGUSR1 in a checkpoint write, SIGINT while a background save is in flight), and each checks the whole
contract of a stop (:func:`assert_stopped`). Each process is ``tests.integration.held_run`` (scripts/train.py,
held at a known step, evaluation or checkpoint write until the test's signal has arrived), so a signal lands
where a test aims it however fast or slow the machine, in a run of 20 steps; the resumes to the end run in
this process, and every test compares with the one uninterrupted run of the same flags (conftest's
``reference_cli_run``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanoresume import checkpoint
from nanoresume.tools import cli
from nanoresume.tools.chaos import final_state_difference
from tests.helpers import REPO, launch_tree, run_main
from tests.integration.held_run import TEARDOWN_MARK

pytestmark = pytest.mark.slow

STOPPED = re.compile(r"stopped by ([\w ]+?) after step (\d+)")
MAX_STEPS = 20  # conftest's tiny run: evaluations and checkpoints at steps 0 (best.pt), 10 and 20


class Training:
    """``tests.integration.held_run`` with these flags, its output (stdout and stderr) read line by line."""

    def __init__(self, args: list[str], *holds: str, signals: int = 1) -> None:
        options = [word for where in holds for word in ("--hold", where)] + ["--signals", str(signals)]
        self.process = launch_tree([sys.executable, "-m", "tests.integration.held_run", *options,
                                    "--teardown-mark", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=REPO)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        with self._seen:
            ok = self._seen.wait_for(lambda: text in self.lines or self.process.poll() is not None, timeout=timeout)
            assert ok and text in self.lines, f"never saw {text!r}; output so far: {self.lines[-8:]}"

    def signal_when_held(self, sig: int, *holds: str) -> None:
        """Send ``sig`` once the run is held at every place in ``holds``."""
        for where in holds:
            self.wait_for(f"HELD {where}")
        self.process.send_signal(sig)

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)  # the last lines
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def args_for(tiny_cli_args, tmp_path: Path):
    """``args_for(name, *extra)``: the tiny run's flags (20 steps) writing to tmp_path/name."""
    return lambda name, *extra: tiny_cli_args(out_dir=str(tmp_path / name)) + list(extra)


@pytest.fixture
def uninterrupted(reference_cli_run) -> Path:
    """The final checkpoint of the tiny run never stopped (run once per session, in-process)."""
    return checkpoint.step_path(reference_cli_run() / "checkpoints", MAX_STEPS)


def resume_to_end(args: list[str], out: Path, capsys: pytest.CaptureFixture) -> Path:
    """``--resume auto`` to the end, in-process (the same state, bit for bit, as a process of its own)."""
    result = run_main(cli.main, args + ["--resume", "auto"], capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    return checkpoint.step_path(out / "checkpoints", MAX_STEPS)


def saved_step(run_output: str) -> int:
    match = STOPPED.search(run_output)
    assert match, run_output
    return int(match.group(2))


def assert_stopped(run: Training, sig: int, step: int, out: Path) -> None:
    """What every stop by a signal does: the process exits 128+signal right after its last line (the
    interpreter's own teardown, about a second, is skipped: everything was saved and closed by then), says
    which signal stopped it after which step, saved that step, and prints the exact command to continue."""
    code = 128 + sig
    assert run.finish() == code, run.output
    assert f"stopped by {signal.Signals(sig).name} after step {step};" in run.output
    assert checkpoint.load_checkpoint(checkpoint.step_path(out / "checkpoints", step))["step"] == step
    assert f"--out-dir {out} --resume auto" in run.output
    assert (out / "exit_code").read_text() == f"{code}\n"
    assert TEARDOWN_MARK not in run.lines, run.output


def test_sigterm_and_then_the_time_limit_save_their_step_exit_with_their_code_and_the_run_resumes_bit_exactly(
        args_for, uninterrupted, tmp_path, capsys):
    """One launch chain: SIGTERM lands while the run is held before step 3, so step 3 ends and is saved; a
    start resumed from it with --time-limit (in-process) saves step 4; a start to the end is bit-exact with
    the run never stopped."""
    out = tmp_path / "stopped"
    args = args_for("stopped")
    run = Training(args, "step:2")
    run.signal_when_held(signal.SIGTERM, "step:2")
    assert_stopped(run, signal.SIGTERM, 3, out)

    # The time limit counts from the process start (test_stop_conditions.py): long past here, so the start
    # trains one step, saves it and exits 75.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "PROCESS_STARTED", time.monotonic() - 100)
        timed = run_main(cli.main, args + ["--resume", "auto", "--time-limit", "1"], capsys)
    assert timed.returncode == 75, timed.stdout + timed.stderr
    assert "stopped by time limit after step 4;" in timed.stdout
    assert f"--out-dir {out} --resume auto" in timed.stdout
    assert (out / "exit_code").read_text() == "75\n"
    checkpoint.load_checkpoint(checkpoint.step_path(out / "checkpoints", 4))

    final = resume_to_end(args, out, capsys)  # the time limit was that start's, not the run's
    assert final_state_difference(final, uninterrupted) is None


def test_sighup_during_evaluation_stops_it_early_without_touching_best_pt_and_resumes_bit_exactly(
        args_for, uninterrupted, tmp_path, capsys):
    """SIGHUP: an SSH session or terminal closing."""
    args = args_for("stopped")
    run = Training(args, "evaluation:2")  # the evaluation at step 10, before its first batch
    run.signal_when_held(signal.SIGHUP, "evaluation:2")
    assert_stopped(run, signal.SIGHUP, 10, tmp_path / "stopped")
    assert "step     10 |" not in run.output  # the cut-short evaluation reported nothing ...
    assert checkpoint.load_checkpoint(tmp_path / "stopped" / "best.pt")["step"] == 0  # ... nor touched best.pt

    final = resume_to_end(args, tmp_path / "stopped", capsys)
    assert final_state_difference(final, uninterrupted) is None


def committed(run: Training) -> list[str]:
    return [line.split()[1] for line in run.lines if line.startswith("COMMITTED step_")]


def test_sigusr1_during_a_checkpoint_write_lets_it_finish_saves_only_once_and_resumes_bit_exactly(
        args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped", "--no-async-save")
    run = Training(args, "write:step_00000010.pt")
    run.signal_when_held(signal.SIGUSR1, "write:step_00000010.pt")
    assert_stopped(run, signal.SIGUSR1, 10, tmp_path / "stopped")
    assert [line for line in run.lines if line.startswith("WRITE step_")] == ["WRITE step_00000010.pt"], run.output
    assert committed(run) == ["step_00000010.pt"]  # the interrupted write finished; no second save

    final = resume_to_end(args, tmp_path / "stopped", capsys)
    assert final_state_difference(final, uninterrupted) is None


def test_sigint_while_a_background_save_is_in_flight_commits_it_then_saves_the_stop_and_resumes_bit_exactly(
        args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped")  # background saving is the default
    run = Training(args, "write:step_00000010.pt", "step:15")  # the step-10 write is held while training goes on
    run.signal_when_held(signal.SIGINT, "write:step_00000010.pt", "step:15")
    assert_stopped(run, signal.SIGINT, 16, tmp_path / "stopped")
    assert committed(run) == ["step_00000010.pt", "step_00000016.pt"], run.output  # the one in flight, then the stop's
    assert checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", 10))["step"] == 10

    final = resume_to_end(args, tmp_path / "stopped", capsys)
    assert final_state_difference(final, uninterrupted) is None


def test_second_ctrl_c_exits_at_once_and_the_next_start_cleans_up(args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped")
    run = Training(args, "write:step_00000010.pt", signals=2)  # the step-10 write is held until the second one
    run.signal_when_held(signal.SIGINT, "write:step_00000010.pt")
    time.sleep(0.5)  # longer than an echo (DUPLICATE_WINDOW): the user insisting
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output
    assert committed(run) == [], run.output  # the held write was cut
    assert run.lines[-1] == "forced exit; last committed checkpoint: none"  # best.pt is no step checkpoint
    folder = tmp_path / "stopped" / "checkpoints"
    assert [p for p in folder.iterdir() if ".tmp." in p.name], "the cut write should leave its temp file"
    assert not checkpoint.step_path(folder, 10).exists()

    result = run_main(cli.main, args + ["--resume", "auto"], capsys)  # in-process
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted write" in result.stderr  # a warning
    assert not [p for p in folder.iterdir() if ".tmp." in p.name]
    assert final_state_difference(checkpoint.step_path(folder, MAX_STEPS), uninterrupted) is None
