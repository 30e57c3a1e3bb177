"""``--self-test`` and ``nanoresume self-test``: real processes, real signals, a verdict that can say yes and no,
and nothing left behind."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from nanoresume.tools import commands, selftest
from nanoresume.tools.chaos import WatchedProcess
from nanoresume.tools.cli import main as train_main
from tests.helpers import REPO, TINY_FLAGS, assert_one_line_error, cli_flags, run_main

pytestmark = pytest.mark.slow

# Steps of ~20 ms: a stop signal lands well before the run's last step, even on a busy machine.
FLAGS = dict(TINY_FLAGS, batch_size=16, max_steps=24)
SABOTAGED_SCENARIO_ENV = "NANORESUME_TEST_FORGET_RNG_IN"  # tests/selftest_sabotage/sitecustomize.py reads it
ROWS = ("straight through", "SIGTERM", "SIGKILL during a save", "SIGINT, SIGKILL, SIGUSR1")


def leftovers(temp: Path) -> list[str]:
    """What is left in a temp folder, but torch's own cache folder (torchinductor_USER), which any
    torch process makes there and keeps for the next."""
    return [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")]


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For a self-test run in this process: the working folder is tmp_path, the temp folder
    tmp_path/tmp (returned), as ``self_test`` sets them for a subprocess."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def test_self_test_of_a_training_config_tells_bit_exact_scenarios_from_one_that_forgets_its_random_numbers(
        tiny_text, in_process, tmp_path, monkeypatch, capsys):
    # Every scenario runs (9 runs); the SIGKILL scenario's runs forget to restore the random streams
    # (tests/selftest_sabotage), so one self-test shows both verdicts: the other scenarios bit-exact, that
    # one caught and explained. (The verdict's wording when all are bit-exact: tests/unit/test_selftest_report.)
    monkeypatch.setenv(SABOTAGED_SCENARIO_ENV, "sigkill")  # the runs are child processes: they inherit it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "tests" / "selftest_sabotage"),
                                                                  str(REPO / "tests" / "harness"),
                                                                  os.environ.get("PYTHONPATH")) if p))
    args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir="not-used"))
    result = run_main(train_main, ["--self-test", *args], capsys)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "warning: --self-test ignores --out-dir" in result.stderr
    lines = out.splitlines()
    assert lines[0].startswith("self-test: --preset cpu, 24 steps on cpu (float32), one process")
    assert "; 4 scenarios, 9 runs, in " in lines[0] and "the other runs take about" in lines[1]
    assert any(line.startswith(ROWS[2]) and "differs from step" in line for line in lines), out
    for row in (ROWS[1], ROWS[3]):
        assert any(line.startswith(row) and "  bit-exact (" in line for line in lines), out
    assert "(in a write)" in out  # the SIGKILL landed inside a checkpoint write
    assert "\nfirst difference: loss at step " in out and f"in the run {ROWS[2]!r}" in out
    assert "RNG streams" in out.split("at the end these differ:")[1].split("; identical")[0]
    assert "is the first step after resuming from step" in out
    assert "NOT bit-exact on this machine with these settings" in out
    assert leftovers(in_process) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_own_loop_example_resumes_bit_exactly_after_sigterm_and_sigkill(in_process, tmp_path, capsys):
    # The command line's --scenarios picks them (5 runs); through the dispatch that `nanoresume` runs. The
    # script runs freely while the self-test watches it: its default 2,000 steps (~1 ms each) leave the
    # watcher about a second between a signal's step and the end, where 400 steps left 0.2 s.
    result = run_main(commands.main, ["self-test", "--scenarios", "sigterm,sigkill",
                                      str(REPO / "examples" / "own_loop.py")], capsys)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "; 3 scenarios, 5 runs" in out
    assert "bit-exact on this machine with these settings (the whole final state" in out
    lines = out.splitlines()
    assert any(line.startswith("SIGTERM") for line in lines) and any(line.startswith("SIGKILL during a save")
                                                                     for line in lines)
    assert leftovers(in_process) == [] and [p.name for p in tmp_path.iterdir()] == ["tmp"]


def test_the_self_test_runs_only_the_scenarios_asked_for_and_refuses_unknown_ones(tmp_path, capsys):
    assert [s.name for s in selftest.chosen_scenarios(["three-stops"])] == ["straight through", ROWS[3]]
    assert selftest.chosen_scenarios(None) == selftest.SCENARIOS and [s.name for s in selftest.SCENARIOS] == list(ROWS)
    with pytest.raises(ValueError, match="unknown self-test scenario"):
        selftest.chosen_scenarios(["sigterm", "nope"])
    assert selftest.scenario_names(" sigterm,three-stops ") == ["sigterm", "three-stops"]
    script = tmp_path / "train.py"
    script.write_text("")
    for names, problem in (("sigterm,nope", "unknown scenario nope"), (",", "no scenario named")):
        assert_one_line_error(run_main(selftest.main, ["--scenarios", names, str(script)], capsys),
                              f"--scenarios {names}: {problem}; name one or more of sigterm, sigkill, three-stops")


@pytest.mark.parametrize("args, needle", [
    (["--max-steps", "3"], "--max-steps 3: --self-test needs at least 8 steps"),
    (["--self-test-nproc", "0"], "--self-test-nproc 0 must be at least 1"),
])
def test_self_test_settings_that_cannot_work_are_one_error_line(args, needle, in_process, capsys):
    assert_one_line_error(run_main(train_main, ["--self-test", *args], capsys), needle)
    assert leftovers(in_process) == []


def test_a_self_test_of_a_missing_script_is_one_error_line(tmp_path, monkeypatch, capsys):
    # Through the dispatch `nanoresume` and `python -m nanoresume` run (their process is test_entry_points')
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_main(commands.main, ["self-test", "nope.py"], capsys), "nope.py: no such script")


HANGING_SCRIPT = """
import os, pathlib, subprocess, sys, time
here = pathlib.Path(sys.argv[1])
# a process the script starts and leaves: once its parent is gone it is no longer below the script
starter = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
           "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
orphan = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True).stdout
(here / "pids").write_text(f"{os.getpid()} {orphan}")
time.sleep(600)  # never saves, never ends
"""


def alive(pid: int) -> bool:
    """Running (a zombie no one has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_script_that_hangs_is_killed_with_all_it_started_after_the_timeout(in_process, tmp_path, monkeypatch,
                                                                              capsys):
    script = tmp_path / "hangs.py"
    script.write_text(HANGING_SCRIPT)
    pids_file = tmp_path / "pids"
    real_wait = WatchedProcess.wait

    def wait_once_it_hangs(self, timeout=None):
        """Start the clock once the script is in its hang, so that the kill has its orphan to find however
        long the start took on a busy machine."""
        deadline = time.monotonic() + 120
        while not pids_file.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return real_wait(self, timeout)

    monkeypatch.setattr(WatchedProcess, "wait", wait_once_it_hangs)
    try:
        code = selftest.main(["--timeout", "1", str(script), str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 1, err
        assert err.strip().splitlines() == ["error: the reference run did not end within 1 s and was killed with every "
                                            "process it started; if it hangs, fix that, or if it is only slow, allow "
                                            "more with --timeout SECONDS"]
        pids = [int(pid) for pid in pids_file.read_text().split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids), pids
        assert leftovers(in_process) == []
    finally:  # never leave a sleeper behind, whatever failed
        for pid in (int(p) for p in pids_file.read_text().split()) if pids_file.exists() else ():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_a_self_test_timeout_that_is_not_a_positive_number_is_one_error_line(value, tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("")
    assert selftest.main(["--timeout", value, str(script)]) == 2
    assert capsys.readouterr().err == f"error: --timeout {float(value):g}: give a number of seconds above 0\n"
