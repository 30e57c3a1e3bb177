"""Uploading to the mirror: the commit order (files, manifest, pointer last), the checks of each
upload, the run's small files, and retention. Each test runs against loopback S3 and a path mirror."""

from __future__ import annotations

import json

import pytest
import torch

from nanoresume.checkpoint import load_checkpoint
from nanoresume.checkpoint.folders import MANIFEST
from nanoresume.mirror import POINTER, Mirror, Pointer, UploadMismatch
from tests.mirror.helpers import make_checkpoint, make_checkpoint_folder, train_state


def record_puts(mirror: Mirror) -> list[str]:
    """The names the mirror writes, in order (put_file may write through put_bytes: one name each)."""
    written: list[str] = []
    put_file, put_bytes = mirror.store.put_file, mirror.store.put_bytes

    def record(name: str, answer):
        if not written or written[-1] != name:
            written.append(name)
        return answer

    mirror.store.put_file = lambda local, name: record(name, put_file(local, name))
    mirror.store.put_bytes = lambda data, name: record(name, put_bytes(data, name))
    return written


def test_a_step_file_is_uploaded_checked_and_then_named_by_the_pointer(target, tmp_path):
    mirror = target.open()
    written = record_puts(mirror)
    local = make_checkpoint(tmp_path / "out" / "checkpoints", 40)
    pointer = mirror.upload_checkpoint(local, 40)
    assert written == ["checkpoints/step_00000040.pt", POINTER]
    assert pointer == Pointer(40, "checkpoints/step_00000040.pt", "file", local.stat().st_size, pointer.digest)
    assert len(pointer.digest) == 64 and pointer.digest in local.read_bytes().decode("latin-1")
    assert mirror.pointer() == pointer
    assert json.loads(mirror.store.read(POINTER))["step"] == 40
    copy = tmp_path / "copy.pt"
    mirror.store.get_file(pointer.name, copy)
    assert torch.equal(load_checkpoint(copy)["model"]["weight"], train_state(40)["model"]["weight"])


def test_a_step_folder_is_uploaded_file_by_file_with_its_manifest_last_then_the_pointer(target, tmp_path):
    mirror = target.open()
    written = record_puts(mirror)
    local = make_checkpoint_folder(tmp_path / "out" / "checkpoints", 50)
    pointer = mirror.upload_checkpoint(local, 50)
    assert written[-2:] == [f"checkpoints/step_00000050/{MANIFEST}", POINTER]
    assert sorted(written[:-2]) == sorted(f"checkpoints/step_00000050/{p.name}" for p in local.iterdir()
                                          if p.name != MANIFEST)
    assert (pointer.kind, pointer.step, pointer.size) == ("folder", 50, sum(p.stat().st_size for p in local.iterdir()))


def test_an_upload_whose_object_differs_from_the_local_file_is_caught(target, tmp_path):
    mirror = target.open()
    local = make_checkpoint(tmp_path / "out" / "checkpoints", 10)
    put_file, put_bytes = mirror.store.put_file, mirror.store.put_bytes

    def put_a_corrupt_copy(data, name):
        if name.endswith(".pt"):
            data = bytearray(data)
            data[-10] ^= 0xFF  # same size, a flipped byte in the digest trailer
        return put_bytes(bytes(data), name)

    mirror.store.put_bytes = put_a_corrupt_copy
    mirror.store.put_file = lambda source, name: put_a_corrupt_copy(source.read_bytes(), name)
    with pytest.raises(UploadMismatch, match="differ"):
        mirror.upload_checkpoint(local, 10)
    assert mirror.pointer() is None, "a pointer must never name an upload that did not check out"
    mirror.store.put_file, mirror.store.put_bytes = put_file, put_bytes
    assert mirror.upload_checkpoint(local, 10).step == 10


def test_the_check_uses_the_checksums_the_store_reports_where_it_reports_them(target, tmp_path):
    mirror = target.open()
    local = make_checkpoint(tmp_path / "out" / "checkpoints", 10)
    mirror.upload_checkpoint(local, 10)
    from nanoresume.mirror.remote import local_md5

    size = local.stat().st_size
    on_s3 = target.url.startswith("s3://")
    checked = mirror.check_object(local, "checkpoints/step_00000010.pt", size, local_md5(local, size))
    assert checked == ("size and MD5" if on_s3 else "size and last bytes")
    data = local.read_bytes()
    answer = mirror.store.put_bytes(data, "checkpoints/step_00000010.pt")
    checked = mirror.check_answer("checkpoints/step_00000010.pt", data, answer)
    assert checked == ("CRC32 of the bytes stored" if on_s3 else None)
    if on_s3:
        with pytest.raises(UploadMismatch, match="CRC32"):
            mirror.check_answer("checkpoints/step_00000010.pt", data[:-1] + b"x", answer)


def test_the_runs_small_files_are_uploaded_once_each_until_they_change(target, tmp_path):
    mirror = target.open()
    out = tmp_path / "out"
    (out / "tb").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "tb" / "events.out.tfevents.1").write_bytes(b"event")
    (out / "exit_code").write_text("0\n")
    from nanoresume.checkpoint import save_atomically

    save_atomically({"format_version": 2, "kind": "weights"}, out / "best.pt")
    first = mirror.upload_extras(out)
    assert sorted(first) == ["best.pt", "best.pt.sha256", "config.json", "exit_code", "metrics.jsonl",
                             "tb/events.out.tfevents.1"]
    assert mirror.upload_extras(out) == []
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    assert mirror.upload_extras(out) == ["metrics.jsonl"]
    assert mirror.store.read("metrics.jsonl").count(b"\n") == 2


def test_retention_keeps_the_newest_the_pointers_and_the_protected_step_and_best_pt(target, tmp_path):
    mirror = target.open()
    folder = tmp_path / "out" / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        mirror.upload_checkpoint(make_checkpoint(folder, step), step)
    mirror.store.put_bytes(b"best", "best.pt")
    deleted = mirror.prune(keep_last=2, protect={20})
    assert sorted(deleted) == ["checkpoints/step_00000010.pt", "checkpoints/step_00000030.pt"]
    assert [c.step for c in mirror.checkpoints()] == [20, 40, 50]
    assert mirror.store.info("best.pt") is not None


def test_retention_never_deletes_above_the_pointer_nor_without_one(target, tmp_path):
    mirror = target.open()
    folder = tmp_path / "out" / "checkpoints"
    mirror.store.put_file(make_checkpoint(folder, 10), "checkpoints/step_00000010.pt")
    assert mirror.prune(keep_last=1) == []  # no pointer yet: nothing is known to be committed
    mirror.upload_checkpoint(make_checkpoint(folder, 20), 20)
    mirror.store.put_file(make_checkpoint(folder, 30), "checkpoints/step_00000030.pt")  # no pointer names it
    assert mirror.prune(keep_last=1) == ["checkpoints/step_00000010.pt"]
    assert [c.step for c in mirror.checkpoints()] == [20, 30]


def test_pruning_a_folder_removes_its_manifest_and_every_file(target, tmp_path):
    mirror = target.open()
    folder = tmp_path / "out" / "checkpoints"
    mirror.upload_checkpoint(make_checkpoint_folder(folder, 10), 10)
    mirror.upload_checkpoint(make_checkpoint_folder(folder, 20), 20)
    assert mirror.prune(keep_last=1) == ["checkpoints/step_00000010"]
    assert mirror.store.walk_files("checkpoints/step_00000010") == {}
    assert [c.step for c in mirror.checkpoints()] == [20]


def test_a_path_mirror_loses_the_temp_files_of_uploads_a_kill_interrupted(path_target, tmp_path):
    mirror = path_target.open()
    mirror.upload_checkpoint(make_checkpoint(tmp_path / "out" / "checkpoints", 10), 10)
    root = tmp_path / "mirror"
    (root / "checkpoints" / ".step_00000020.pt.tmp.4242").write_bytes(b"half")
    (root / "notes.txt").write_text("mine")
    assert mirror.remove_leftovers() == ["checkpoints/.step_00000020.pt.tmp.4242"]
    assert (root / "notes.txt").exists() and (root / "checkpoints" / "step_00000010.pt").exists()


def test_the_mirror_says_which_run_it_holds(target, tmp_path):
    mirror = target.open()
    assert mirror.run_config() is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"seed": 7}')
    mirror.upload_extras(tmp_path / "out")
    assert mirror.run_config() == {"seed": 7}
