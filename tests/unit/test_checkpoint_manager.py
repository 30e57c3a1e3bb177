"""The run's step checkpoints: resume resolution, retention, abandoned timelines, and the
decide / stage / commit contract in synchronous and background mode."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoresume import checkpoint
from nanoresume.training_state import require_train_state
from nanoresume.checkpoint import (CheckpointDir, CheckpointManager, checksum_path, load_checkpoint, resolve_resume,
                                   save_atomically, step_path)
from nanoresume.errors import CheckpointError, CheckpointWriteError
from nanoresume.rundir import RunDir

from tests.unit.test_checkpoint import WriteProgress, small_state


# ---- resume resolution --------------------------------------------------------------------------


def manager_with_steps(folder: Path, steps: list[int], keep_last: int = 10) -> CheckpointManager:
    manager = CheckpointManager(folder, interval=1, keep_last=keep_last)
    for step in steps:
        manager.save(step, small_state(step))
    manager.wait()  # pruning runs on a thread of its own, even for synchronous saves
    return manager


def test_auto_resumes_from_the_newest_checkpoint(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2, 3])
    warnings: list[str] = []
    path, state = resolve_resume("auto", manager.dir, warnings.append, accept=require_train_state)
    assert path == step_path(tmp_path, 3) and state["step"] == 3
    assert warnings == []


def test_auto_falls_back_past_a_corrupt_newest_file_with_one_warning_naming_it(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2, 3])
    newest = step_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:50])
    warnings: list[str] = []
    path, state = resolve_resume("auto", manager.dir, warnings.append, accept=require_train_state)
    assert path == step_path(tmp_path, 2) and state["step"] == 2
    assert len(warnings) == 1 and str(newest) in warnings[0]


def test_auto_returns_none_on_an_empty_or_missing_folder(tmp_path):
    warnings: list[str] = []
    (tmp_path / "empty").mkdir()
    for folder in ("missing", "empty"):
        assert resolve_resume("auto", CheckpointDir(tmp_path / folder), warnings.append,
                              accept=require_train_state) is None
    assert warnings == []


def test_auto_refuses_and_touches_nothing_when_checkpoints_exist_but_none_can_be_used(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2])
    for step in (1, 2):
        path = step_path(tmp_path, step)
        path.write_bytes(path.read_bytes()[:-1])  # truncated: neither digest can vouch for it
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    warnings: list[str] = []
    with pytest.raises(CheckpointError) as info:
        resolve_resume("auto", manager.dir, warnings.append, accept=require_train_state)
    message = str(info.value)
    assert "\n" not in message and "step_00000001.pt" in message and "step_00000002.pt" in message
    assert "move them away" in message and "--" not in message  # library terms: no command-line flags
    assert len(warnings) == 2
    with pytest.raises(CheckpointError) as info:
        resolve_resume("auto", manager.dir, warnings.append, advice=RunDir.checkpoint_advice,
                       accept=require_train_state)
    message = str(info.value)  # the training command's words: how to see why, and its flags
    assert f"ckpt verify {tmp_path}" in message and "--out-dir" in message and "step_00000002.pt" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_step_files_copied_without_their_sidecars_are_resumed_not_destroyed(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2, 3])
    for sidecar in tmp_path.glob("*.sha256"):
        sidecar.unlink()
    path, state = resolve_resume("auto", manager.dir, print, accept=require_train_state)
    assert path == step_path(tmp_path, 3) and state["step"] == 3


def test_a_folder_named_like_a_step_checkpoint_is_refused_at_start_naming_it(tmp_path):
    manager = manager_with_steps(tmp_path, [10])
    (tmp_path / "step_00000025.pt").mkdir()
    with pytest.raises(CheckpointError) as info:
        resolve_resume("auto", manager.dir, print, accept=require_train_state)
    assert "step_00000025.pt is a folder" in str(info.value) and "move it out" in str(info.value)


def test_none_refuses_when_checkpoints_exist_pointing_at_resume_auto_and_out_dir(tmp_path):
    manager = manager_with_steps(tmp_path, [4])
    with pytest.raises(CheckpointError) as info:
        resolve_resume("none", manager.dir, print, accept=require_train_state)
    message = str(info.value)
    assert "mode 'auto'" in message and "--" not in message and "step_00000004.pt" in message
    with pytest.raises(CheckpointError) as info:
        resolve_resume("none", manager.dir, print, advice=RunDir.checkpoint_advice, accept=require_train_state)
    message = str(info.value)
    assert "--resume auto" in message and "--out-dir" in message and "step_00000004.pt" in message
    assert resolve_resume("none", CheckpointDir(tmp_path / "fresh"), print, accept=require_train_state) is None


def test_an_explicit_path_must_exist_and_load(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), CheckpointDir(tmp_path), print, accept=require_train_state)
    manager = manager_with_steps(tmp_path, [1, 2])
    path, state = resolve_resume(str(step_path(tmp_path, 1)), manager.dir, print, accept=require_train_state)
    assert state["step"] == 1


def test_an_explicit_path_to_inference_weights_is_refused(tmp_path):
    best = tmp_path / "best.pt"
    save_atomically({"format_version": 1, "kind": "weights", "model": {}}, best)
    with pytest.raises(CheckpointError, match="not a full training state"):
        resolve_resume(str(best), CheckpointDir(tmp_path), print, accept=require_train_state)


# ---- retention and leftovers --------------------------------------------------------------------


def test_keep_last_keeps_exactly_the_newest_k_step_files_and_never_best_pt(tmp_path):
    save_atomically(small_state(0), tmp_path / "best.pt")
    manager = manager_with_steps(tmp_path, [10, 20, 30, 40, 50], keep_last=2)
    assert [s.step for s in manager.dir.list()] == [40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "best.pt.sha256",
        "step_00000040.pt", "step_00000040.pt.sha256", "step_00000050.pt", "step_00000050.pt.sha256"]


def test_step_names_are_zero_padded_so_name_order_is_step_order(tmp_path):
    manager = manager_with_steps(tmp_path, [9, 10, 100000000])
    assert [s.step for s in manager.dir.list()] == [9, 10, 100000000]
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == [s.path.name for s in manager.dir.list()]




# ---- abandoned timelines ------------------------------------------------------------------------


def test_a_second_abandoned_timeline_never_overwrites_the_first(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2])
    first = manager.dir.set_aside_after(1)
    first_bytes = first[0].read_bytes()
    manager.save(2, small_state(2) | {"other": torch.ones(3)})  # a different step 2 on the new timeline
    second = manager.dir.set_aside_after(1)
    assert first[0].parent != second[0].parent
    assert first[0].read_bytes() == first_bytes and load_checkpoint(first[0])["step"] == 2
    assert "other" in load_checkpoint(second[0])
    assert [s.step for s in manager.dir.list()] == [1]


@pytest.mark.parametrize("killed_after", ["link the file", "link the sidecar", "remove the file"])
def test_a_kill_at_any_point_of_a_set_aside_leaves_every_pair_verifiable(tmp_path, monkeypatch, killed_after):
    """Stop the move part-way (as a kill would), then start again: nothing is lost or unverifiable."""
    manager = manager_with_steps(tmp_path, [1, 2])
    steps = {"link the file": 1, "link the sidecar": 2, "remove the file": 3}[killed_after]
    calls = {"n": 0}
    real_link, real_unlink = os.link, Path.unlink

    class Killed(BaseException):
        pass

    def count() -> None:
        calls["n"] += 1
        if calls["n"] > steps:
            raise Killed

    monkeypatch.setattr(os, "link", lambda a, b: (count(), real_link(a, b)))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (count(), real_unlink(self, missing_ok)))
    with pytest.raises(Killed):
        manager.dir.set_aside_after(1)
    monkeypatch.undo()
    checkpoint.remove_leftovers(tmp_path)  # what the next start does first
    manager.dir.set_aside_after(1)
    copies = list((tmp_path / "abandoned").rglob("step_00000002.pt"))
    assert copies and all(load_checkpoint(c)["step"] == 2 for c in copies)
    assert all(checksum_path(c).exists() for c in copies if c.parent.name == "2")
    assert [s.step for s in manager.dir.list()] == [1]


# ---- decide, stage, commit ----------------------------------------------------------------------


def test_is_due_on_the_interval_when_forced_and_never_twice_for_one_step(tmp_path):
    manager = CheckpointManager(tmp_path, interval=5, keep_last=10)
    assert [s for s in range(1, 12) if manager.is_due(s)] == [5, 10]
    manager.save(10, small_state(10))
    assert not manager.is_due(10, force=True)  # already saved
    assert manager.is_due(11, force=True)


def test_every_seconds_makes_a_save_due_off_the_interval(tmp_path):
    now = [100.0]
    manager = CheckpointManager(tmp_path, interval=1000, keep_last=3, every_seconds=60, clock=lambda: now[0])
    assert not manager.is_due(7)
    now[0] += 61
    assert manager.is_due(7)
    manager.save(7, small_state(7))
    assert not manager.is_due(8)
    assert manager.is_due(8, time_due=True)  # a collective decision overrides this process's clock


@pytest.fixture(params=[False, True], ids=["sync", "background"])
def background(request) -> bool:
    return request.param


def test_save_commits_the_state_as_it_was_when_save_was_called(tmp_path, background):
    manager = CheckpointManager(tmp_path, interval=1, keep_last=3, background=background)
    live = {"format_version": 1, "kind": "train", "step": 1, "weights": torch.zeros(1000)}
    manager.save(1, live)
    live["weights"].add_(1.0)  # training goes on while the write may still be in flight
    manager.wait()
    assert manager.committed_step == 1
    assert torch.equal(load_checkpoint(step_path(tmp_path, 1))["weights"], torch.zeros(1000))


def test_a_background_file_is_byte_identical_to_a_synchronous_one(tmp_path):
    shared = torch.randn(64, 8)
    state = {"format_version": 1, "kind": "train", "step": 3, "model": {"wte": shared, "head": shared},
             "opt": {"m": torch.randn(5), "v": torch.randn(5)[1:3]}, "config": {"lr": 0.1}}
    for mode in (False, True):
        manager = CheckpointManager(tmp_path / str(mode), interval=1, keep_last=3, background=mode)
        manager.save(3, state)
        manager.close()
    sync, background_file = (step_path(tmp_path / str(m), 3).read_bytes() for m in (False, True))
    assert sync == background_file
    loaded = load_checkpoint(step_path(tmp_path / "True", 3))
    assert loaded["model"]["wte"].untyped_storage().data_ptr() == loaded["model"]["head"].untyped_storage().data_ptr()


def test_a_background_save_returns_before_its_commit_and_wait_returns_after_it(tmp_path, monkeypatch):
    release = threading.Event()
    manager = CheckpointManager(tmp_path, interval=1, keep_last=3, background=True,
                                observer=WriteProgress(lambda written: release.wait(10)))
    manager.save(1, small_state(1))
    assert manager.in_flight and manager.staged_step == 1 and manager.committed_step is None
    assert not step_path(tmp_path, 1).exists()
    release.set()
    manager.wait()
    assert manager.committed_step == 1 and load_checkpoint(step_path(tmp_path, 1))["step"] == 1


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_a_background_write_error_reaches_the_training_thread_and_keeps_earlier_files(tmp_path, monkeypatch,
                                                                                       error):
    manager_with_steps(tmp_path, [1], keep_last=1)

    def fail(written: int) -> None:
        if written > 100:
            raise OSError(error, os.strerror(error))

    manager = CheckpointManager(tmp_path, interval=1, keep_last=1, background=True, observer=WriteProgress(fail))
    manager.save(2, small_state(2))
    with pytest.raises(CheckpointWriteError, match=os.strerror(error)):
        manager.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    assert manager.committed_step is None
    manager.wait()  # reported once, not again


def test_the_next_save_waits_for_the_one_in_flight_so_at_most_one_runs(tmp_path, monkeypatch):
    active, most = [0], [0]
    lock = threading.Lock()
    real_save = checkpoint.manager.save_atomically

    def counting_save(obj: Any, path: Path, **kwargs: Any) -> str:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real_save(obj, path, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(checkpoint.manager, "save_atomically", counting_save)
    manager = CheckpointManager(tmp_path, interval=1, keep_last=2, background=True)
    for step in range(1, 6):
        manager.save(step, small_state(step))
    manager.close()
    assert most[0] == 1
    assert [s.step for s in manager.dir.list()] == [4, 5]


def test_pruning_happens_only_after_the_new_commit(tmp_path):
    manager_with_steps(tmp_path, [1], keep_last=1)

    def disk_full(written: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    manager = CheckpointManager(tmp_path, interval=1, keep_last=1, observer=WriteProgress(disk_full))
    with pytest.raises(CheckpointWriteError):
        manager.save(2, small_state(2))
    assert [s.step for s in manager.dir.list()] == [1]


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "background"])
def test_sidecar_and_pruning_trouble_after_a_commit_neither_crash_nor_fail_the_save(tmp_path, monkeypatch,
                                                                                   background):
    """The commit is done when they run: a file emptied by someone else or a folder that cannot be
    listed just now costs a sidecar or a late prune, never a thread's traceback or a failed save."""
    manager = CheckpointManager(tmp_path, interval=1, keep_last=1, background=background)
    manager.save(1, small_state(1))
    manager.wait()

    def empty_then_sidecar(path: Path) -> str:
        path.write_bytes(b"")  # mmap of an empty file raises ValueError, not OSError
        return checkpoint.files.write_checksum_file(path)

    def unreadable_folder() -> list:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint.manager, "write_checksum_file", empty_then_sidecar)
    monkeypatch.setattr(manager.dir, "list", unreadable_folder)
    crashed: list = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    manager.save(2, small_state(2))
    manager.wait()
    manager.close()
    assert crashed == [] and manager.committed_step == 2
    assert step_path(tmp_path, 1).exists()  # the prune that could not list waits for the next save


# ---- errors in library terms --------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "background"])
def test_a_failed_write_speaks_library_terms_unless_the_caller_words_the_fix(tmp_path, background):
    def disk_full(written: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for advice, expected in [(None, "save elsewhere"), (RunDir.checkpoint_advice, "choose another --out-dir")]:
        folder = tmp_path / str(advice is None)
        manager = CheckpointManager(folder, interval=1, keep_last=1, background=background, advice=advice,
                                    observer=WriteProgress(disk_full))
        with pytest.raises(CheckpointWriteError) as info:
            manager.save(1, small_state(1))
            manager.wait()
        message = str(info.value)
        assert "No space left on device" in message and expected in message and "intact" in message
        assert ("--" in message) == (advice is not None)
        assert info.value.problem in message and "\n" not in message
