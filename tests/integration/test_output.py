"""What a real process prints: a bar only for a terminal, plain lines for a log file, warnings on
stderr, a summary at the end; and output that goes away or cannot be written never stops training."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from nanoresume.tools import cli
from tests.helpers import REPO, TRAIN_SCRIPT, run_main

pytestmark = pytest.mark.slow

TENSORBOARD_FULL = "warning: TensorBoard logging stopped: No space left on device; training goes on"


def with_terminal_stderr(args: list[str], timeout: float = 120) -> tuple[int, str, str]:
    """Run train.py with stderr on a pseudo-terminal, as in an interactive shell; (code, stdout, terminal)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], stdout=subprocess.PIPE, stderr=slave,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.close(slave)
    terminal = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        terminal.append(chunk)
    os.close(master)
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    return process.wait(timeout=timeout), stdout, b"".join(terminal).decode(errors="replace")


def test_a_log_file_gets_plain_lines_and_no_bar_and_ends_with_a_summary(tiny_cli_args, tmp_path, capsys):
    flags = tiny_cli_args(max_steps=20, eval_interval=10, log_interval=5)
    flags.remove("--no-progress")
    proc = run_main(cli.main, flags, capsys)  # in-process; capsys's streams are no terminal, as a log file is not
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and proc.stderr == ""
    stdout = proc.stdout
    plain = [line for line in stdout.splitlines() if re.match(r"step +\d+ \| loss ", line)]
    assert [int(line.split()[1]) for line in plain] == [5, 10, 15, 20]
    assert re.fullmatch(r"step +5 \| loss \d\.\d{4} \| lr \d\.\d\de-\d\d \| [\d,]+ tok/s \| \d+:\d\d:\d\d", plain[0])
    last = stdout.splitlines()[-1]
    assert re.fullmatch(rf"finished: 20 steps, 2,560 tokens, best val loss \d\.\d{{4}} in "
                        rf"{re.escape(str(tmp_path / 'out' / 'best.pt'))}, wall time \d+:\d\d:\d\d", last), last


def test_progress_forces_the_bar_into_a_log_and_a_terminal_gets_it_by_default(tiny_cli_args, capsys):
    flags = tiny_cli_args(max_steps=6, eval_interval=3)
    flags.remove("--no-progress")
    forced = run_main(cli.main, flags + ["--progress", "--out-dir", flags[flags.index("--out-dir") + 1] + "-forced"],
                      capsys)  # in-process, into capsys's streams: no terminal
    assert forced.returncode == 0 and "\r" in forced.stderr and "6/6" in forced.stderr
    code, stdout, terminal = with_terminal_stderr(flags)
    assert code == 0, terminal
    assert "\r" in terminal and "6/6" in terminal  # the bar
    assert "finished: 6 steps" in stdout


def test_warnings_go_to_stderr_not_stdout(tiny_cli_args, tmp_path, capsys):
    """In-process: the console looks its streams up at each line, so capsys sees what the fds would."""
    assert run_main(cli.main, tiny_cli_args(max_steps=2, eval_interval=2), capsys).returncode == 0
    (tmp_path / "out" / "checkpoints" / ".step_00000004.pt.tmp.999").write_bytes(b"half a write")
    proc = run_main(cli.main, tiny_cli_args(max_steps=4, eval_interval=2, resume="auto"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: removed ") and "interrupted write" in proc.stderr
    assert "warning:" not in proc.stdout


def held_until_stdout_is_gone(args: list[str], **kwargs) -> subprocess.Popen:
    """train.py with ARGS, held before step 3 until the reader of its stdout pipe has closed it (it prints
    ``HELD step:2`` there first), so that the rest of the run writes into a pipe nobody reads, however fast
    or slow the machine (tests/integration/held_run.py)."""
    return subprocess.Popen([sys.executable, "-m", "tests.integration.held_run", "--hold", "step:2",
                             "--until-stdout-gone", *args], stdout=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kwargs)


def test_a_stdout_that_goes_away_does_not_stop_training_or_saving(tiny_cli_args, tmp_path):
    """train.py ... | head -2"""
    args = tiny_cli_args(max_steps=10, eval_interval=5, log_interval=1)
    process = held_until_stdout_is_gone(args, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    read = [process.stdout.readline(), process.stdout.readline()]
    while read[-1] and not read[-1].startswith("HELD"):  # the lines before the hold, more than two
        read.append(process.stdout.readline())
    process.stdout.close()  # head has read its lines and exited
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert stderr.splitlines() == ["warning: stdout went away (Broken pipe); its lines are dropped from here on"]
    assert (tmp_path / "out" / "checkpoints" / "step_00000010.pt").is_file()


def test_stdout_and_stderr_going_away_together_with_a_bar_does_not_stop_training(tiny_cli_args, tmp_path):
    """train.py --progress ... 2>&1 | head -2"""
    args = tiny_cli_args(max_steps=10, eval_interval=5, log_interval=1) + ["--progress"]
    process = held_until_stdout_is_gone(args, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    read = b""
    while b"HELD step:2\n" not in read and (chunk := process.stdout.read1(200)):
        read += chunk
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert (tmp_path / "out" / "checkpoints" / "step_00000010.pt").is_file()


def test_ckpt_show_into_a_reader_that_left_reports_no_error(reference_cli_run):
    """ckpt.py show ... | head -1: the reader is gone before the tool writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ckpt.py"), "show",
                               str(reference_cli_run() / "best.pt")], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # as for any tool whose reader left: 128 + SIGPIPE, and no message


@pytest.mark.parametrize("good_writes", [0, 20], ids=["full-at-start", "fills-mid-run"])
def test_tensorboard_that_cannot_write_warns_once_and_training_goes_on(tiny_cli_args, tmp_path, good_writes, capsys,
                                                                       monkeypatch):
    # TensorBoard's RecordWriter is what both the old background writer and ours call for every event:
    # failing it after some writes is a disk filling up, at once a disk that is full from the start.
    from tensorboard.summary.writer import record_writer

    real_write, writes = record_writer.RecordWriter.write, [0]

    def write(self, data):
        writes[0] += 1
        if writes[0] > good_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    proc = run_main(cli.main, tiny_cli_args(max_steps=40, eval_interval=10), capsys)  # a thread's traceback shows too
    assert proc.returncode == 0, proc.stderr
    assert writes[0] > good_writes
    assert proc.stderr.splitlines() == [TENSORBOARD_FULL]  # one warning, no thread traceback
    assert "finished: 40 steps" in proc.stdout
    assert (tmp_path / "out" / "checkpoints" / "step_00000040.pt").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 40 + 5  # the other sinks go on
