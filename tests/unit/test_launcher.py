"""The launcher of a torchrun worker: its command line as the user typed it, and noticing its death."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from nanoresume import launcher


def test_torchrun_s_console_script_reads_as_torchrun_and_the_module_form_as_typed():
    assert launcher.torchrun_words(["/venv/bin/python3", "/venv/bin/torchrun", "--nproc-per-node", "2", "train.py"]) \
        == ["torchrun", "--nproc-per-node", "2", "train.py"]
    module = ["python", "-m", "torch.distributed.run", "--standalone", "train.py", "--max-steps", "5"]
    assert launcher.torchrun_words(module) == module
    assert launcher.torchrun_words(["python", "-u", "train.py"]) is None  # a worker's parent that is no torchrun
    assert launcher.torchrun_words([]) is None


def test_resume_auto_replaces_any_resume_flag_with_one_at_the_end():
    assert launcher.resume_auto(["torchrun", "t.py", "--resume", "none", "--lr", "1"]) == \
        ["torchrun", "t.py", "--lr", "1", "--resume", "auto"]
    assert launcher.resume_auto(["torchrun", "t.py", "--resume=out/checkpoints/step_00000010.pt"]) == \
        ["torchrun", "t.py", "--resume", "auto"]


def test_the_command_of_a_parent_that_is_not_torchrun_is_unknown():
    assert launcher.launcher_command() is None  # pytest's parent: a shell or a runner, never torchrun
    assert launcher.launcher_command(pid=2 ** 22 + 1) is None  # no such process


def test_the_watch_calls_back_once_the_parent_is_no_longer_the_one_it_was():
    called = threading.Event()
    thread = launcher._start_watch(os.getppid() + 1, called.set, interval=0.01)  # "the parent changed"
    assert called.wait(30)
    thread.join(30)
    assert not thread.is_alive()


def test_a_process_whose_parent_dies_gets_sigterm():
    """A child sets the death signal up and reports how; its parent exits; the child then dies of SIGTERM."""
    script = (
        "import os, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import sys, time; from nanoresume import launcher; print(launcher.stop_when_launcher_dies(), flush=True); "
        "time.sleep(60)'], stdout=subprocess.PIPE, text=True)\n"
        "print(child.pid, child.stdout.readline().strip(), flush=True)\n"
    )
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    pid, how = parent.stdout.split()
    assert how == ("prctl" if sys.platform.startswith("linux") else "watch")
    for _ in range(600):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return  # exited, not yet reaped
        except OSError:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"the orphan {pid} is still running")
