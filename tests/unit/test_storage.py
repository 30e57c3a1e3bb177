"""LocalStorage: what the commit protocol needs from a filesystem, on the local disk."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from nanoresume.checkpoint import CheckpointDir, CheckpointObserver, load_checkpoint, save_atomically, verify_file
from nanoresume.checkpoint.storage import FILE, FOLDER, LOCAL, OTHER, Entry, NotAFileError, Reading
from nanoresume.errors import CheckpointError, CheckpointWriteError
from tests.unit.test_checkpoint import small_state


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_new_file_appears_under_its_name_only_when_published(tmp_path):
    target = tmp_path / "step_00000001.pt"
    new = LOCAL.create(str(target))
    new.file.write(b"payload")
    assert not target.exists() and len(names(tmp_path)) == 1  # only the temp file so far
    new.publish()
    assert names(tmp_path) == ["step_00000001.pt"] and target.read_bytes() == b"payload"
    new.discard()  # a no-op once published
    assert target.read_bytes() == b"payload"


def test_a_discarded_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    new = LOCAL.create(target)
    new.file.write(b"new, half written")
    new.discard()
    assert names(tmp_path) == ["best.pt"] and target.read_bytes() == b"old"


def test_publishing_replaces_an_existing_file_whole(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    new = LOCAL.create(target)
    new.file.write(b"new")
    new.publish()
    assert names(tmp_path) == ["best.pt"] and target.read_bytes() == b"new"


def test_a_new_folder_is_written_aside_and_appears_whole_when_published(tmp_path):
    target = tmp_path / "step_00000005"
    new = LOCAL.create_folder(str(target), tag="42")
    Path(new.path).mkdir()
    (Path(new.path) / "shard").write_bytes(b"x")
    assert not target.exists() and Path(new.path).parent == tmp_path
    new.publish()
    assert names(tmp_path) == ["step_00000005"] and (target / "shard").read_bytes() == b"x"


def test_a_folder_is_not_published_over_a_folder_with_files_in_it(tmp_path):
    target = tmp_path / "step_00000005"
    target.mkdir()
    (target / "kept").write_bytes(b"k")
    new = LOCAL.create_folder(target, tag="7")
    Path(new.path).mkdir()
    with pytest.raises(FileExistsError):
        new.publish()
    new.discard()
    assert names(tmp_path) == ["step_00000005"] and names(target) == ["kept"]


def test_reading_maps_the_open_file_so_replacing_the_name_changes_nothing(tmp_path):
    path = tmp_path / "a.pt"
    path.write_bytes(b"first contents")
    with LOCAL.open_read(str(path)) as reading:
        other = tmp_path / "b.pt"
        other.write_bytes(b"second")
        os.replace(other, path)
        assert bytes(reading.data) == b"first contents"
        if reading.local_name is not None:  # Linux: /proc/self/fd/N, the same open file
            assert Path(reading.local_name).read_bytes() == b"first contents"


def test_reading_an_empty_file_gives_no_bytes(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with LOCAL.open_read(tmp_path / "empty") as reading:
        assert len(reading.data) == 0


@pytest.mark.parametrize("case, error", [("missing", FileNotFoundError), ("folder", IsADirectoryError),
                                         ("device", NotAFileError)])
def test_reading_what_is_not_a_file_raises_an_os_error_that_says_so(tmp_path, case, error):
    path = {"missing": tmp_path / "missing.pt", "folder": tmp_path, "device": Path(os.devnull)}[case]
    with pytest.raises(error):
        with LOCAL.open_read(path):
            pass


def test_kind_and_list_tell_files_folders_and_links_apart(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    assert LOCAL.kind(tmp_path / "file") == FILE and LOCAL.kind(tmp_path / "folder") == FOLDER
    assert LOCAL.kind(tmp_path / "nothing") is None and LOCAL.kind(os.devnull) == OTHER
    listed = {e.name: (e.kind, e.link) for e in LOCAL.list(str(tmp_path))}
    assert listed == {"file": (FILE, False), "folder": (FOLDER, False), "link": (FOLDER, True)}
    assert LOCAL.list(tmp_path / "nothing") == []


def test_removing_is_quiet_about_what_is_gone_and_a_folder_goes_whole(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    LOCAL.remove(tmp_path / "file")
    LOCAL.remove(tmp_path / "file")
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "shard").write_bytes(b"x")
    LOCAL.remove_folder(str(folder))
    assert names(tmp_path) == []
    LOCAL.sync(tmp_path)
    LOCAL.sync(tmp_path / "nothing")  # nothing to make durable


# ---- the seam holds without rename: an object store in memory ---------------------------------------


class MemoryStore:
    """An object store without rename or folders: an object appears whole, under its final key, when
    its upload completes (publish); a "folder" is a key prefix."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def create(self, path):
        store, key = self, str(path)

        class Upload:
            def __init__(self) -> None:
                self.file = io.BytesIO()

            def publish(self) -> None:
                store.objects[key] = self.file.getvalue()

            def discard(self) -> None:
                pass  # an upload never completed leaves nothing behind

        return Upload()

    def create_folder(self, path, tag):
        raise NotImplementedError

    @contextlib.contextmanager
    def open_read(self, path):
        key = str(path)
        if key not in self.objects:
            raise IsADirectoryError(key) if self.kind(key) == FOLDER else FileNotFoundError(key)
        yield Reading(self.objects[key])

    def kind(self, path):
        key = str(path)
        return FILE if key in self.objects else FOLDER if any(k.startswith(key + "/") for k in self.objects) \
            else None

    def list(self, folder):
        prefix = str(folder).rstrip("/") + "/"
        names = {k[len(prefix):].split("/")[0] for k in self.objects if k.startswith(prefix)}
        return [Entry(name, self.kind(prefix + name)) for name in names]

    def remove(self, path):
        self.objects.pop(str(path), None)

    def remove_folder(self, path):
        for key in [k for k in self.objects if k.startswith(str(path) + "/")]:
            del self.objects[key]

    def sync(self, folder):
        pass


def test_the_commit_protocol_works_on_an_object_store_without_rename_under_a_url():
    store, folder = MemoryStore(), "mem://bucket/run/checkpoints"
    for step in (1, 2, 3):
        save_atomically(small_state(step), f"{folder}/step_{step:08d}.pt", storage=store)
    assert sorted(store.objects) == [f"{folder}/step_0000000{s}.pt{x}" for s in (1, 2, 3) for x in ("", ".sha256")]
    assert load_checkpoint(f"{folder}/step_00000002.pt", storage=store)["step"] == 2
    checkpoints = CheckpointDir(folder, storage=store)
    assert [(s.step, s.path) for s in checkpoints.list()] == [(s, f"{folder}/step_0000000{s}.pt") for s in (1, 2, 3)]
    checkpoints.prune(keep=f"{folder}/step_00000003.pt", keep_last=2)
    assert [s.step for s in checkpoints.list()] == [2, 3] and f"{folder}/step_00000001.pt.sha256" not in store.objects


def test_on_an_object_store_a_failed_write_leaves_no_object_and_a_damaged_one_is_refused():
    store, path = MemoryStore(), "mem://bucket/step_00000001.pt"

    class DiskFull(CheckpointObserver):
        def on_write_progress(self, path, nbytes: int) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_atomically(small_state(), path, storage=store, observer=DiskFull())
    assert store.objects == {}
    save_atomically(small_state(), path, storage=store)
    damaged = bytearray(store.objects[path])
    damaged[len(damaged) // 2] ^= 1
    store.objects[path] = bytes(damaged)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, storage=store)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        verify_file("mem://bucket/step_00000002.pt", storage=store)
