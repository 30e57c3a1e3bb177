"""``--self-test`` and ``nanoresume self-test``: real processes, real signals, a verdict that can say yes and no,
and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.probes import FORGET_RNG_ENV
from tests.helpers import REPO, TINY_FLAGS, assert_one_line_error, cli_flags, run_train

pytestmark = pytest.mark.slow

# Steps of ~20 ms: a stop signal lands well before the run's last step, even on a busy machine.
FLAGS = dict(TINY_FLAGS, batch_size=16, max_steps=24)
ROWS = ("straight through", "SIGTERM", "SIGKILL during a save", "SIGINT, SIGKILL, SIGUSR1")


def leftovers(temp: Path) -> list[str]:
    """What is left in a temp folder, but torch's own cache folder (torchinductor_USER), which any
    torch process makes there and keeps for the next."""
    return [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")]


def self_test(args: list[str], workdir: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``train.py --self-test ARGS`` in ``workdir`` with a temp folder of its own; returns (result, temp)."""
    temp = workdir / "tmp"
    temp.mkdir()
    result = run_train(["--self-test", *args], timeout=400, cwd=workdir, env={"TMPDIR": str(temp), **env})
    return result, temp


def test_self_test_of_a_training_config_is_bit_exact_and_leaves_nothing_behind(tiny_text, tmp_path):
    args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir="not-used"))
    result, temp = self_test(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: --self-test ignores --out-dir" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("self-test: --preset cpu, 24 steps on cpu (float32), one process")
    assert "the other runs take about" in lines[1]
    for row in ROWS[1:]:
        assert any(line.startswith(row) and "  bit-exact (" in line for line in lines), result.stdout
    assert "(in a write)" in result.stdout  # the SIGKILL landed inside a checkpoint write
    assert lines[-1].startswith("bit-exact on this machine with these settings (every step's loss and the whole "
                                "final state, bit for bit")
    assert leftovers(temp) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_self_test_catches_a_resume_that_forgets_its_random_numbers(tiny_text, tmp_path):
    harness = os.pathsep.join(p for p in (str(REPO / "tests" / "harness"), os.environ.get("PYTHONPATH")) if p)
    result, temp = self_test(cli_flags(dict(FLAGS, data=str(tiny_text))), tmp_path, **{FORGET_RNG_ENV: "1"},
                             PYTHONPATH=harness)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    for row in ROWS[1:]:
        assert any(line.startswith(row) and "differs from step" in line for line in out.splitlines()), out
    assert "\nfirst difference: loss at step " in out
    assert "RNG streams" in out.split("at the end these differ:")[1].split("; identical")[0]
    assert "is the first step after resuming from step" in out
    assert "NOT bit-exact on this machine with these settings" in out
    assert leftovers(temp) == []


def test_own_loop_example_resumes_bit_exactly_after_sigterm_and_sigkill(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "nanoresume", "self-test", str(REPO / "examples" / "own_loop.py"),
                             "--steps", "400"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-exact on this machine with these settings (the whole final state" in result.stdout
    assert any(line.startswith("SIGKILL during a save") for line in result.stdout.splitlines())
    assert leftovers(temp) == [] and [p.name for p in tmp_path.iterdir()] == ["tmp"]


@pytest.mark.parametrize("args, needle", [
    (["--max-steps", "3"], "--max-steps 3: --self-test needs at least 8 steps"),
    (["--self-test-nproc", "0"], "--self-test-nproc 0 must be at least 1"),
])
def test_self_test_settings_that_cannot_work_are_one_error_line(args, needle, tmp_path):
    result, _ = self_test(args, tmp_path)
    assert_one_line_error(result, needle)


def test_a_self_test_of_a_missing_script_is_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "nanoresume", "self-test", "nope.py"], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=60)
    assert_one_line_error(result, "nope.py: no such script")
