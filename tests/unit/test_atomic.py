"""atomic: one temp-name scheme with one recognizer, and writes that leave the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanoresume import atomic
from nanoresume.atomic import (DELETING, AtomicFile, is_temp_path, temp_name, temp_path, temp_target, temp_writer_pid,
                               write_file_atomically)


def test_a_temp_name_is_hidden_beside_its_target_and_names_it_and_its_writer():
    assert temp_name("step_00000005.pt", tag=123) == ".step_00000005.pt.tmp.123"
    assert temp_name("best.pt") == f".best.pt.tmp.{os.getpid()}"
    assert temp_path(Path("/run/checkpoints/step_00000005"), tag="77", purpose=DELETING) == \
        Path("/run/checkpoints/.step_00000005.deleting.77")


@pytest.mark.parametrize("name, target", [
    (".step_00000005.pt.tmp.123", "step_00000005.pt"),
    (".step_00000005.pt.sha256.tmp.9", "step_00000005.pt.sha256"),
    (".config.json.tmp.5", "config.json"),
    (".step_00000010.tmp.4242", "step_00000010"),  # a folder written by every rank under one token
])
def test_the_recognizer_gives_back_the_target_of_every_temp_name(name, target):
    assert temp_target(name) == target
    assert temp_target(temp_name(target, tag=1)) == target
    assert is_temp_path(Path("/x") / name)


@pytest.mark.parametrize("name", ["step_00000005.pt", "best.pt.tmp.1", ".hidden", ".x.tmp.", ".x.tmp.a b",
                                  "notes.tmp.1", ".step_00000005.deleting.3"])
def test_the_recognizer_ignores_names_that_are_not_writes_in_progress(name):
    assert temp_target(name) is None
    assert not is_temp_path(Path(name))


def test_a_folder_being_deleted_is_recognized_only_when_asked_for():
    assert temp_target(".step_00000005.deleting.3", (atomic.WRITING, DELETING)) == "step_00000005"


@pytest.mark.parametrize("name, pid", [(".data.bin.tmp.4242", 4242), (".data.bin.tmp.ab12cd", None),
                                       (".data.bin.deleting.4242", None), ("data.bin", None)])
def test_the_writer_pid_is_read_only_from_a_write_in_progress_named_by_a_pid(name, pid):
    assert temp_writer_pid(name) == pid


def test_write_file_atomically_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    write_file_atomically(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["config.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_bytes(b"old")

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="Input/output error"):
        write_file_atomically(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["config.json"]


def test_an_atomic_file_left_unpublished_is_removed(tmp_path):
    with AtomicFile(tmp_path / "best.pt") as new:
        new.file.write(b"half")
        assert new.temp.exists()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with AtomicFile(tmp_path / "best.pt") as new:
            new.file.write(b"half")
            raise RuntimeError("the writer died")
    assert os.listdir(tmp_path) == []


def test_fsync_folder_is_quiet_where_a_folder_cannot_be_opened(tmp_path):
    atomic.fsync_folder(tmp_path)
    atomic.fsync_folder(tmp_path / "missing")
    atomic.remove_quietly(tmp_path / "missing")
