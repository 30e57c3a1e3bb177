"""Real processes, real signals: each stop exits 128+signal, saves its step, and resumes bit-exactly.

Each process is ``tests.integration.held_run`` (scripts/train.py, held at a known step, evaluation or
checkpoint write until the test's signal has arrived), so a signal lands where a test aims it however fast
or slow the machine, in a run of 20 steps; the resumes to the end run in this process, and every test
compares with the one uninterrupted run of the same flags (conftest's ``reference_cli_run``)."""

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


def test_each_signal_saves_the_next_step_exits_with_its_code_at_once_and_resumes_bit_exactly_as_a_time_limit_does(
        args_for, uninterrupted, tmp_path, capsys, monkeypatch):
    """One launch chain, each start resumed from the stop before: SIGTERM, SIGINT, SIGUSR1 and SIGHUP (an SSH
    session or terminal closing) each land while the run is held before a step; the step in progress ends, is
    saved, and the process exits with 128+signal right after its last line (the interpreter's own teardown,
    about a second, is skipped). Then a start with --time-limit (in-process), then one to the end, bit-exact
    with the run never stopped."""
    out = tmp_path / "stopped"
    args = args_for("stopped")
    for held, sig, code in ((2, signal.SIGTERM, 143), (5, signal.SIGINT, 130), (8, signal.SIGUSR1, 138),
                            (12, signal.SIGHUP, 129)):
        run = Training(args + (["--resume", "auto"] if held > 2 else []), f"step:{held}")
        run.signal_when_held(sig, f"step:{held}")
        assert run.finish() == code, run.output
        assert saved_step(run.output) == held + 1 and f"stopped by {signal.Signals(sig).name} after step" in run.output
        assert checkpoint.load_checkpoint(checkpoint.step_path(out / "checkpoints", held + 1))["step"] == held + 1
        assert f"--out-dir {out} --resume auto" in run.output  # the exact command to continue
        assert (out / "exit_code").read_text() == f"{code}\n"
        assert TEARDOWN_MARK not in run.lines, run.output  # everything was saved and closed by then

    # The time limit counts from the process start (test_stop_conditions.py): long past here, so the start
    # trains one step, saves it and exits 75.
    monkeypatch.setattr(cli, "PROCESS_STARTED", time.monotonic() - 100)
    timed = run_main(cli.main, args + ["--resume", "auto", "--time-limit", "1"], capsys)
    assert timed.returncode == 75, timed.stdout + timed.stderr
    assert "stopped by time limit after step 14;" in timed.stdout
    assert (out / "exit_code").read_text() == "75\n"
    checkpoint.load_checkpoint(checkpoint.step_path(out / "checkpoints", 14))
    monkeypatch.undo()

    final = resume_to_end(args, out, capsys)  # the time limit was that start's, not the run's
    assert final_state_difference(final, uninterrupted) is None


def test_signal_during_evaluation_stops_it_early_without_touching_best_pt(args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped")
    run = Training(args, "evaluation:2")  # the evaluation at step 10, before its first batch
    run.signal_when_held(signal.SIGTERM, "evaluation:2")
    assert run.finish() == 143, run.output
    assert saved_step(run.output) == 10
    assert "step     10 |" not in run.output  # the cut-short evaluation reported nothing ...
    assert checkpoint.load_checkpoint(tmp_path / "stopped" / "best.pt")["step"] == 0  # ... nor touched best.pt

    final = resume_to_end(args, tmp_path / "stopped", capsys)
    assert final_state_difference(final, uninterrupted) is None


def committed(run: Training) -> list[str]:
    return [line.split()[1] for line in run.lines if line.startswith("COMMITTED step_")]


def test_signal_during_a_checkpoint_write_lets_it_finish_and_saves_only_once(args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped", "--no-async-save")
    run = Training(args, "write:step_00000010.pt")
    run.signal_when_held(signal.SIGTERM, "write:step_00000010.pt")
    assert run.finish() == 143, run.output
    assert saved_step(run.output) == 10
    assert [line for line in run.lines if line.startswith("WRITE step_")] == ["WRITE step_00000010.pt"], run.output
    assert committed(run) == ["step_00000010.pt"]  # the interrupted write finished; no second save
    checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", 10))

    final = resume_to_end(args, tmp_path / "stopped", capsys)
    assert final_state_difference(final, uninterrupted) is None


def test_signal_while_a_background_save_is_in_flight_commits_it_then_saves_the_stop(args_for, uninterrupted,
                                                                                     tmp_path, capsys):
    args = args_for("stopped")  # background saving is the default
    run = Training(args, "write:step_00000010.pt", "step:15")  # the step-10 write is held while training goes on
    run.signal_when_held(signal.SIGTERM, "write:step_00000010.pt", "step:15")
    assert run.finish() == 143, run.output
    assert saved_step(run.output) == 16
    assert committed(run) == ["step_00000010.pt", "step_00000016.pt"], run.output  # the one in flight, then the stop's
    folder = tmp_path / "stopped" / "checkpoints"
    for step in (10, 16):
        assert checkpoint.load_checkpoint(checkpoint.step_path(folder, step))["step"] == step

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
