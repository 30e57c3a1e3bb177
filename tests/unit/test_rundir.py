"""RunDir: a run's folder, its lock against a second run, its leftovers and its small files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nanoresume.errors import ConfigError, UserError
from nanoresume.rundir import RunDir
from tests.helpers import REPO


def test_the_layout_is_spelled_once_here(tmp_path):
    run = RunDir(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (run.checkpoints, run.best, run.config, run.metrics,
                                                          run.tensorboard, run.exit_code, run.lock_file)] == \
        ["checkpoints", "best.pt", "config.json", "metrics.jsonl", "tb", "exit_code", ".lock"]


def test_a_second_run_on_the_same_folder_is_refused_until_the_first_closes(tmp_path):
    first, second = RunDir(tmp_path / "out"), RunDir(tmp_path / "out")
    first.open(print)
    with pytest.raises(UserError, match="another training run is using --out-dir"):
        second.open(print)
    first.close()
    second.open(print)  # the lock went with the first run
    second.close()
    second.close()  # closing twice is harmless


def test_the_lock_holds_against_another_process_and_dies_with_its_holder(tmp_path):
    run = RunDir(tmp_path)
    run.open(print)
    try:
        code = ("import sys; from nanoresume.rundir import RunDir\n"
                "try:\n    RunDir(sys.argv[1]).open(print)\nexcept Exception as e:\n    sys.exit(str(e))\n")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                               cwd=REPO)
        assert other.returncode == 1 and "another training run" in other.stderr
    finally:
        run.close()


def test_opening_creates_the_folders_clears_leftovers_and_the_last_exit_code(tmp_path):
    run = RunDir(tmp_path / "out")
    run.checkpoints.mkdir(parents=True)
    leftovers = [run.root / ".best.pt.tmp.12", run.root / ".config.json.tmp.3",
                 run.checkpoints / ".step_00000004.pt.tmp.9", run.checkpoints / "step_00000002.pt.sha256"]
    for path in leftovers:
        path.write_text("x")
    (run.checkpoints / ".step_00000006.tmp.55").mkdir()
    (run.root / "notes.txt").write_text("mine")
    run.exit_code.write_text("75\n")
    warnings: list[str] = []
    run.open(warnings.append)
    run.close()
    assert sorted(os.listdir(run.root)) == [".lock", "checkpoints", "notes.txt"]
    assert os.listdir(run.checkpoints) == []
    assert len(warnings) == 5 and all("left by an interrupted write" in w for w in warnings)


def test_a_folder_that_cannot_be_written_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"--out-dir {blocker} is not writable"):
        RunDir(blocker).open(print)


def test_config_json_reads_back_and_a_broken_one_is_named(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_config() is None
    run.write_config({"lr": 0.001, "seed": 1})
    assert run.read_config() == {"lr": 0.001, "seed": 1}
    assert json.loads(run.config.read_text()) == {"lr": 0.001, "seed": 1}
    run.config.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        run.read_config()
    run.config.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds no config object"):
        run.read_config()


def test_the_exit_code_is_written_for_job_scripts_and_never_fails_the_run(tmp_path):
    run = RunDir(tmp_path)
    run.write_exit_code(75)
    assert run.exit_code.read_text() == "75\n"
    RunDir(tmp_path / "missing" / "deeper").write_exit_code(0)  # best effort: nothing raised
