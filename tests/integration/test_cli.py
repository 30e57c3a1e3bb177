"""scripts/train.py: exit codes, files written, one-line errors.

One real subprocess for a bad flag; the other cases call the script's ``main(argv)`` in this process, which
is everything the script does but the process start (a finished run's real process, and its exit code, is
test_entry_points.py's installed command and test_output.py's run on a terminal)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from nanoresume.config import TrainConfig, flag
from nanoresume.tools import cli
from tests.helpers import assert_one_line_error, run_main, run_train


@pytest.fixture
def train(capsys):
    """``train(argv)``: scripts/train.py's main in this process; a CompletedProcess as ``run_train`` gives."""
    return lambda argv: run_main(cli.main, argv, capsys)


def test_a_tiny_run_exits_0_and_writes_events_config_checkpoints_and_best(train, tiny_cli_args, tmp_path):
    proc = train(tiny_cli_args(max_steps=20))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 20 and config["n_embd"] == 32 and config["n_layer"] == 2
    assert config["lr"] == 3e-3 and config["dropout"] == 0.1 and config["preset"] == "cpu"
    assert config["beta2"] == TrainConfig().beta2  # defaults resolved, not left out
    assert set(config) == {f.name for f in dataclasses.fields(TrainConfig)} | {
        "world_size", "global_batch_size", "tokens_per_step"}  # derived, for the reader
    assert config["world_size"] == 1 and config["global_batch_size"] == 4 and config["tokens_per_step"] == 128
    assert (out / "exit_code").read_text() == "0\n"  # for job scripts: how this start ended
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["step_00000010.pt", "step_00000010.pt.sha256", "step_00000020.pt", "step_00000020.pt.sha256"]
    assert (out / "best.pt").is_file() and (out / "best.pt.sha256").is_file()
    assert re.search(r"step\s+20 \| train loss", proc.stdout)


@pytest.mark.slow
def test_resume_none_refuses_a_used_out_dir_and_resume_auto_continues_it(train, tiny_cli_args):
    assert train(tiny_cli_args(max_steps=10)).returncode == 0
    refused = train(tiny_cli_args(max_steps=10))  # --resume defaults to none
    assert_one_line_error(refused, "--resume auto", "--out-dir")
    resumed = train(tiny_cli_args(max_steps=12, resume="auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000010.pt" in resumed.stdout
    assert "changed on resume: --max-steps: 10 -> 12" in resumed.stdout


@pytest.mark.slow
def test_resume_auto_with_only_out_dir_takes_every_other_setting_from_the_checkpoint(train, tiny_cli_args, tmp_path):
    assert train(tiny_cli_args(max_steps=10)).returncode == 0
    out = tmp_path / "out"
    # No --data, no model flags: the tiny model and its data come from the checkpoint, not the defaults.
    resumed = train(["--out-dir", str(out), "--resume", "auto", "--max-steps", "14", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "changed on resume: --max-steps: 10 -> 14" in resumed.stdout
    assert "changed on resume: --n-embd" not in resumed.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["max_steps"]) == (32, 2, 14)
    assert (out / "checkpoints" / "step_00000014.pt").is_file()


@pytest.mark.slow
def test_resume_auto_keeps_the_checkpoints_dtype_unless_told_otherwise(train, tiny_cli_args, tmp_path):
    assert train(tiny_cli_args(max_steps=4, dtype="bfloat16", deterministic=False)).returncode == 0
    resumed = train(["--out-dir", str(tmp_path / "out"), "--resume", "auto", "--max-steps", "6", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(bfloat16)" in resumed.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["dtype"], config["deterministic"]) == ("bfloat16", False)


@pytest.mark.slow
def test_resume_auto_on_an_empty_out_dir_starts_fresh_and_says_so(train, tiny_cli_args):
    proc = train(tiny_cli_args(max_steps=2, resume="auto"))
    assert proc.returncode == 0, proc.stderr
    assert "starting a new run" in proc.stdout


@pytest.mark.slow
def test_resume_from_a_corrupt_path_exits_2_with_one_line_naming_it(train, tiny_cli_args, tmp_path):
    bad = tmp_path / "step_00000005.pt"
    bad.write_bytes(b"\x00" * 100)
    (tmp_path / "step_00000005.pt.sha256").write_text("0" * 64 + "  step_00000005.pt\n")
    assert_one_line_error(train(tiny_cli_args(resume=str(bad))), str(bad), "checksum")


@pytest.mark.slow
def test_resume_with_a_different_model_width_exits_2_naming_the_field(train, tiny_cli_args):
    assert train(tiny_cli_args(max_steps=2)).returncode == 0
    proc = train(tiny_cli_args(max_steps=4, resume="auto", n_embd=64))
    assert_one_line_error(proc, "--n-embd is 32 in the checkpoint but 64 now")


def test_help_lists_every_flag_and_exits_0(train):
    proc = train(["--help"])
    assert proc.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert flag(f.name) in proc.stdout, f"{flag(f.name)} missing from --help"
    assert "--no-progress" in proc.stdout and "--resume" in proc.stdout


@pytest.mark.parametrize("extra, named", [
    (["--max-steps", "-1"], "--max-steps"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be divisible by --n-head 4"),
    (["--time-limit", "abc"], "--time-limit"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--max-steps", "ten"], "--max-steps"),
    (["--preset", "huge"], "--preset"),
    (["--dropout", "1.5"], "--dropout"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**70)], "--seed"),
    (["--lr", "1e308"], "--lr"),
    (["--data", "/dev/zero"], "not a regular file"),
])
def test_a_bad_flag_exits_2_with_one_line_naming_it(train, tiny_cli_args, extra, named):
    assert_one_line_error(train(tiny_cli_args() + extra), named)


def test_a_bad_flag_through_the_real_script_exits_2_with_one_line_naming_it(tiny_cli_args):
    assert_one_line_error(run_train(tiny_cli_args() + ["--bogus-flag", "1"], timeout=60), "--bogus-flag")


@pytest.mark.slow
def test_a_missing_data_path_exits_2_naming_data(train, tiny_cli_args):
    assert_one_line_error(train(tiny_cli_args(data="/nonexistent/corpus.txt")), "--data", "/nonexistent")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing resume path", "empty data file", "cuda without cuda", "fifo as data"])
def test_a_user_error_known_before_training_exits_2_without_creating_out(train, tiny_cli_args, tmp_path, case):
    empty, fifo = tmp_path / "empty.txt", tmp_path / "pipe.txt"
    empty.write_text("")
    os.mkfifo(fifo)
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    flags, named = {
        "missing resume path": (dict(resume=str(tmp_path / "missing.pt")), "no such checkpoint file"),
        "empty data file": (dict(data=str(empty)), "no text"),
        "cuda without cuda": (dict(device="cuda"), "no CUDA device"),
        "fifo as data": (dict(data=str(fifo)), "not a regular file"),
    }[case]
    assert_one_line_error(train(tiny_cli_args(**flags)), named)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_model_too_big_for_memory_exits_2_in_one_line_instead_of_hanging(train, tiny_cli_args):
    assert_one_line_error(train(tiny_cli_args(n_layer=10**6)), "--n-layer 1000000", "GB")


@pytest.mark.slow
def test_a_block_size_larger_than_the_data_exits_2_naming_block_size(train, tiny_cli_args, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few bytes of text, " * 8)
    assert_one_line_error(train(tiny_cli_args(data=str(small), block_size=64)), "--block-size 64")
