"""Disk full, I/O errors, read-only folders, NaN losses, odd $TMPDIR: clear errors, nothing good lost."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch

from nanoresume import checkpoint
from nanoresume.checkpoint import load_checkpoint, step_path
from nanoresume.errors import CheckpointWriteError, NonFiniteLossError, UserError
from nanoresume.trainer import Trainer
from nanoresume.tools import cli
from tests.helpers import run_main, stop_after


def leftover_temp_files(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if ".tmp." in p.name]


@pytest.fixture
def failing_writes():
    """``failing_writes(err)``: from now on every checkpoint write fails with OSError(err)."""
    registered = []

    class Fail(checkpoint.CheckpointObserver):
        def __init__(self, code: int) -> None:
            self.code = code

        def on_write_progress(self, path: Path, nbytes: int) -> None:
            raise OSError(self.code, os.strerror(self.code))

    def arm(code: int) -> None:
        registered.append(checkpoint.observe(Fail(code)))

    yield arm
    for stop_observing in registered:
        stop_observing()


def after_pending_writes(trainer: Trainer, arm: Callable[[int], None], code: int, now: bool) -> None:
    """Arm the failure once the writes already under way have committed: on a slow machine a background
    write of an earlier step may still be running, and must not be the one that fails."""
    if now:
        trainer.manager.wait()
        arm(code)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_save_stops_the_run_with_one_line_and_keeps_earlier_checkpoints(make_config, failing_writes, code,
                                                                                 async_save):
    cfg = make_config(max_steps=30, ckpt_interval=5, eval_interval=1000, async_save=async_save)
    trainer = Trainer(cfg, on_step=lambda tr, step, loss: after_pending_writes(tr, failing_writes, code, step == 7))
    with pytest.raises(CheckpointWriteError) as failure:
        trainer.run()
    message = str(failure.value)
    assert "\n" not in message
    assert os.strerror(code) in message and "step_00000010.pt" in message
    assert "MB needed" in message and "MB free" in message and "--out-dir" in message
    out = Path(cfg.out_dir)
    # Stopped instead of training on with nothing saved: at once, or (in the background) at a later step.
    assert trainer.counters.step == 10 if not async_save else 10 <= trainer.counters.step < 15
    assert not step_path(out / "checkpoints", 10).exists()
    assert load_checkpoint(step_path(out / "checkpoints", 5))["step"] == 5
    assert load_checkpoint(out / "best.pt")["step"] == 0
    assert leftover_temp_files(out) == []


def test_an_fsync_error_fails_the_save_cleanly(make_config, monkeypatch):
    cfg = make_config(max_steps=30, ckpt_interval=5, eval_interval=1000)

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def break_fsync_at_step_7(tr, step, loss):
        if step == 7:
            tr.manager.wait()  # step 5's background write commits first, however slow the machine
            monkeypatch.setattr(os, "fsync", broken_fsync)

    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        Trainer(cfg, on_step=break_fsync_at_step_7).run()
    monkeypatch.undo()
    assert load_checkpoint(step_path(Path(cfg.out_dir) / "checkpoints", 5))["step"] == 5
    assert leftover_temp_files(Path(cfg.out_dir)) == []


def test_a_failed_best_pt_write_keeps_the_previous_best_pt(make_config, failing_writes):
    cfg = make_config(max_steps=30, eval_interval=10, ckpt_interval=1000)
    trainer = Trainer(cfg, on_step=lambda tr, step, loss: after_pending_writes(tr, failing_writes, errno.ENOSPC,
                                                                             step == 15))
    with pytest.raises(CheckpointWriteError, match="best.pt"):
        trainer.run()
    best = load_checkpoint(Path(cfg.out_dir) / "best.pt")
    assert best["step"] == 10


def can_mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        if not can_mount_tmpfs(where, options):
            pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_real_full_disk_exits_1_with_one_line_and_the_earlier_checkpoint_intact(tiny_cli_args, tmpfs, capsys):
    out = tmpfs("size=1m") / "run"
    # best.pt (~150 KB) and the step-5 checkpoint (~450 KB) fit in 1 MB; the step-10 one does not.
    result = run_main(cli.main, tiny_cli_args(out_dir=str(out), max_steps=100, ckpt_interval=5, keep_last=100,
                                              eval_interval=1000), capsys)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: could not write checkpoint"), result.stderr
    assert "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr
    assert load_checkpoint(step_path(out / "checkpoints", 5))["step"] == 5
    assert leftover_temp_files(out) == []


def test_a_read_only_out_dir_is_refused_before_training_naming_the_path(make_config, tmpfs):
    read_only = tmpfs("ro")
    with pytest.raises(UserError, match=f"--out-dir {read_only / 'run'} is not writable"):
        Trainer(make_config(out_dir=str(read_only / "run")))


def test_an_unwritable_out_dir_is_refused_before_training_monkeypatched(make_config, monkeypatch, tmp_path):
    def refuse(fd: int) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(UserError, match="not writable .*Read-only file system"):
        Trainer(make_config(out_dir=str(tmp_path / "run")))


def test_a_read_only_out_dir_exits_2_from_the_cli(tiny_cli_args, tmpfs, capsys):
    read_only = tmpfs("ro")
    result = run_main(cli.main, tiny_cli_args(out_dir=str(read_only / "run")), capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out-dir {read_only / 'run'} is not writable (Read-only file system); "
        f"choose a folder you can write to"]


def poison(trainer: Trainer) -> None:
    with torch.no_grad():
        trainer.raw_model.wte.weight.fill_(float("nan"))


def test_a_nan_loss_stops_naming_the_step_and_saves_nothing_from_it(make_config):
    cfg = make_config(max_steps=30, ckpt_interval=5, eval_interval=5)
    trainer = Trainer(cfg, on_step=lambda tr, step, loss: poison(tr) if step == 7 else None)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 8; .*\(newest checkpoint: step 5\)"):
        trainer.run()
    folder = Path(cfg.out_dir) / "checkpoints"
    assert [p.name for p in sorted(folder.glob("step_*.pt"))] == ["step_00000005.pt"]
    for saved in (load_checkpoint(step_path(folder, 5)), load_checkpoint(Path(cfg.out_dir) / "best.pt")):
        assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_nan_loss_before_any_checkpoint_says_there_is_none_instead_of_step_none(make_config):
    cfg = make_config(max_steps=30, ckpt_interval=100, eval_interval=100)
    trainer = Trainer(cfg, on_step=lambda tr, step, loss: poison(tr) if step == 2 else None)
    with pytest.raises(NonFiniteLossError) as failure:
        trainer.run()
    assert "(no checkpoint yet)" in str(failure.value) and "None" not in str(failure.value)


def test_a_nan_loss_after_a_resume_names_the_checkpoint_it_resumed_from(make_config):
    cfg = make_config(max_steps=30, ckpt_interval=4, eval_interval=100)
    Trainer(cfg, on_step=stop_after(4)).run()
    resumed = Trainer(dataclasses.replace(cfg, resume="auto"), on_step=lambda tr, step, loss: poison(tr))
    with pytest.raises(NonFiniteLossError, match=r"at step 6; .*\(newest checkpoint: step 4\)"):
        resumed.run()


def test_non_finite_weights_are_never_written_to_a_checkpoint(make_config):
    cfg = make_config(max_steps=30, ckpt_interval=5, eval_interval=1000)
    trainer = Trainer(cfg, on_step=lambda tr, step, loss: poison(tr) if step == 10 else None)
    with pytest.raises(NonFiniteLossError, match="wte.weight holds NaN/inf at step 10"):
        trainer.run()
    assert not step_path(Path(cfg.out_dir) / "checkpoints", 10).exists()


def test_tmpdir_on_a_missing_folder_does_not_matter(tiny_cli_args, tmp_path, capsys, monkeypatch):
    """In-process: $TMPDIR is read when a temp name is first asked for, so forgetting the cached one
    makes this process see the missing folder as a new one would."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "does-not-exist"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    result = run_main(cli.main, tiny_cli_args(max_steps=10), capsys)
    assert result.returncode == 0, result.stderr
    load_checkpoint(step_path(tmp_path / "out" / "checkpoints", 10))
