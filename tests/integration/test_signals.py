"""Real processes, real signals: each stop exits 128+signal, saves its step, and resumes bit-exactly."""

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
from nanoresume.tools.chaos import EVAL_MARK, WRITE_DELAY_ENV, WRITE_DONE_MARK, WRITE_MARK, final_state_difference
from nanoresume.tools import cli
from tests.helpers import REPO, TRAIN_SCRIPT, run_main, run_train

pytestmark = pytest.mark.slow

STOPPED = re.compile(r"stopped by ([\w ]+?) after step (\d+)")
STEP_LINE = re.compile(r"step +(\d+) \|")
TEARDOWN_MARK = "interpreter teardown ran"
# scripts/train.py, with an exit handler that prints TEARDOWN_MARK if the interpreter's teardown runs
TRAIN_WITH_TEARDOWN_MARK = (f"import atexit, runpy, sys; atexit.register(print, {TEARDOWN_MARK!r}, flush=True); "
                            f"sys.argv[0] = {str(TRAIN_SCRIPT)!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
MAX_STEPS = 300  # ~15 ms a step: a few seconds of training to land signals in


class Training:
    """scripts/train.py (or the chaos child, for slowed writes) with its output read line by line."""

    def __init__(self, args: list[str], slow_writes: float = 0.0, observed: bool = False,
                 teardown_mark: bool = False) -> None:
        command = [sys.executable, *(["-c", TRAIN_WITH_TEARDOWN_MARK] if teardown_mark else [str(TRAIN_SCRIPT)]), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slow_writes or observed:
            command = [sys.executable, "-m", "nanoresume.tools.chaos_child", "child", *args]
            env[WRITE_DELAY_ENV] = str(slow_writes)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=REPO)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        with self._seen:
            ok = self._seen.wait_for(lambda: any(text in line for line in self.lines), timeout=timeout)
        assert ok, f"never saw {text!r}; output so far: {self.lines[-5:]}"

    def wait_for_a_step_line_after(self, step: int, timeout: float = 60) -> None:
        """Until the run prints the evaluation line of a step after ``step``."""
        def seen() -> bool:
            return any(int(m.group(1)) > step for m in map(STEP_LINE.match, self.lines) if m)

        with self._seen:
            ok = self._seen.wait_for(seen, timeout=timeout)
        assert ok, f"never saw a step after {step}; output so far: {self.lines[-5:]}"

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.1)  # let the reader thread take the last lines
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def args_for(tiny_cli_args, tmp_path: Path):
    def make(name: str, **overrides) -> list[str]:
        values = dict(max_steps=MAX_STEPS, eval_interval=20, ckpt_interval=1000, out_dir=str(tmp_path / name))
        values.update(overrides)
        return tiny_cli_args(**values)

    return make


@pytest.fixture
def uninterrupted(reference_cli_run):
    """``uninterrupted(**overrides)``: the final checkpoint of a run of ``args_for``'s flags that was never
    stopped, run once per session for each set of overrides."""

    def make(**overrides) -> Path:
        values = dict(max_steps=MAX_STEPS, eval_interval=20, ckpt_interval=1000)
        values.update(overrides)
        return checkpoint.step_path(reference_cli_run(**values) / "checkpoints", values["max_steps"])

    return make


def resume_to_end(args: list[str], out: Path, capsys: pytest.CaptureFixture, max_steps: int = MAX_STEPS) -> Path:
    """``--resume auto`` to the end, in-process (the same state, bit for bit, as a process of its own)."""
    result = run_main(cli.main, args + ["--resume", "auto"], capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    return checkpoint.step_path(out / "checkpoints", max_steps)


def saved_step(run_output: str) -> int:
    match = STOPPED.search(run_output)
    assert match, run_output
    return int(match.group(2))


def test_each_signal_and_the_time_limit_save_their_step_exit_with_their_code_and_resume_bit_exactly(
        args_for, uninterrupted, tmp_path, capsys):
    """One launch chain: SIGTERM, then SIGINT, SIGUSR1 and --time-limit each in a start resumed from the
    stop before, then a start to the end, bit-exact with the run never stopped."""
    args = args_for("stopped")
    last = 0
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)):
        run = Training(args + (["--resume", "auto"] if last else []))
        if last:
            run.wait_for_a_step_line_after(last)  # training again, past the step it resumed from
        else:
            run.wait_for("step      0 |")
            time.sleep(0.5)
        run.process.send_signal(sig)
        assert run.finish() == code
        assert f"stopped by {signal.Signals(sig).name} after step" in run.output
        step = saved_step(run.output)
        assert last < step < MAX_STEPS, (last, step)
        saved = checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", step))
        assert saved["step"] == step
        assert f"--out-dir {tmp_path / 'stopped'} --resume auto" in run.output  # the exact command to continue
        assert (tmp_path / "stopped" / "exit_code").read_text() == f"{code}\n"
        last = step

    # Counted from process start (test_stop_conditions.py) with a second to spare for the save: 1 s is
    # spent after the first step on any machine, so the run never finishes first, however fast.
    result = run_train(args + ["--resume", "auto", "--time-limit", "1"])
    assert result.returncode == 75, result.stdout + result.stderr
    assert "stopped by time limit" in result.stdout
    step = saved_step(result.stdout)
    assert last < step < MAX_STEPS, (last, step)
    checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", step))

    final = resume_to_end(args, tmp_path / "stopped", capsys)  # the time limit was that start's, not the run's
    assert final_state_difference(final, uninterrupted()) is None


def test_sighup_saves_exits_129_and_the_process_ends_right_after_its_last_line(args_for, tmp_path):
    run = Training(args_for("stopped"), teardown_mark=True)
    run.wait_for("step      0 |")
    time.sleep(0.5)
    run.process.send_signal(signal.SIGHUP)  # an SSH session or terminal closing
    run.wait_for("stopped by SIGHUP after step")
    assert run.finish() == 129
    # Everything is saved and closed by then; the interpreter's own teardown (about a second) is skipped.
    assert TEARDOWN_MARK not in run.lines, run.output
    checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", saved_step(run.output)))


def test_signal_during_evaluation_stops_it_early_without_touching_best_pt(args_for, uninterrupted, tmp_path, capsys):
    # 1500 validation batches make each evaluation last far longer than the 20 steps before it.
    flags = dict(max_steps=40, eval_interval=20, eval_iters=1500)
    args = args_for("stopped", **flags)
    run = Training(args, observed=True)
    wait_for_marks(run, EVAL_MARK, 2)  # the evaluation after step 20 has begun
    time.sleep(0.2)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    assert saved_step(run.output) == 20
    assert "step     20 |" not in run.output  # the cut-short evaluation reported nothing ...
    assert checkpoint.load_checkpoint(tmp_path / "stopped" / "best.pt")["step"] == 0  # ... nor touched best.pt

    final = resume_to_end(args, tmp_path / "stopped", capsys, max_steps=40)
    assert final_state_difference(final, uninterrupted(**flags)) is None


def wait_for_marks(run: Training, mark: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while run.output.count(mark) < count:
        assert time.monotonic() < deadline, run.output
        time.sleep(0.002)


# Evaluations only at step 0 and the end; checkpoints every 20 steps. So the second
# write of the run (after best.pt at step 0) is the step-20 checkpoint, and the signal is sent
# when it begins: 60 steps leave room enough, whatever the speed.
SAVE_FLAGS = dict(max_steps=60, eval_interval=1000, ckpt_interval=20)


def test_signal_during_a_checkpoint_write_lets_it_finish_and_saves_only_once(args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped", **SAVE_FLAGS) + ["--no-async-save"]
    run = Training(args, slow_writes=0.003)  # a checkpoint write now takes about a second
    wait_for_marks(run, WRITE_MARK, 2)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    assert saved_step(run.output) == 20
    assert run.output.count(WRITE_MARK) == 2  # the interrupted write finished; no second save
    checkpoint.load_checkpoint(checkpoint.step_path(tmp_path / "stopped" / "checkpoints", 20))

    final = resume_to_end(args, tmp_path / "stopped", capsys, max_steps=SAVE_FLAGS["max_steps"])
    assert final_state_difference(final, uninterrupted(**SAVE_FLAGS)) is None


def test_signal_while_a_background_save_is_in_flight_commits_it_then_saves_the_stop(args_for, uninterrupted,
                                                                                     tmp_path, capsys):
    args = args_for("stopped", **SAVE_FLAGS)  # background saving is the default
    run = Training(args, slow_writes=0.003)
    wait_for_marks(run, WRITE_MARK, 2)  # the step-20 checkpoint is being written while training goes on
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    stopped_at = saved_step(run.output)
    assert stopped_at > 20
    assert run.output.count(WRITE_DONE_MARK) == 3  # best.pt at step 0, step 20 (in flight), the stop's step
    folder = tmp_path / "stopped" / "checkpoints"
    for step in (20, stopped_at):
        assert checkpoint.load_checkpoint(checkpoint.step_path(folder, step))["step"] == step

    final = resume_to_end(args, tmp_path / "stopped", capsys, max_steps=SAVE_FLAGS["max_steps"])
    assert final_state_difference(final, uninterrupted(**SAVE_FLAGS)) is None


def test_second_ctrl_c_exits_at_once_and_the_next_start_cleans_up(args_for, uninterrupted, tmp_path, capsys):
    args = args_for("stopped", **SAVE_FLAGS)
    run = Training(args, slow_writes=0.05)  # a checkpoint write now takes many seconds
    wait_for_marks(run, WRITE_MARK, 2)
    run.process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # longer than an echo (DUPLICATE_WINDOW): the user insisting
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130
    assert run.output.count(WRITE_DONE_MARK) == 1, run.output  # best.pt's; the slow write (~30 s) was cut
    assert run.lines[-1] == "forced exit; last committed checkpoint: none"  # best.pt is no step checkpoint
    folder = tmp_path / "stopped" / "checkpoints"
    assert [p for p in folder.iterdir() if ".tmp." in p.name], "the cut write should leave its temp file"
    assert not checkpoint.step_path(folder, 20).exists()

    result = run_main(cli.main, args + ["--resume", "auto"], capsys)  # in-process
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted write" in result.stderr  # a warning
    assert not [p for p in folder.iterdir() if ".tmp." in p.name]
    final = checkpoint.step_path(folder, SAVE_FLAGS["max_steps"])
    assert final_state_difference(final, uninterrupted(**SAVE_FLAGS)) is None
