"""Resuming from the mirror: which checkpoint is chosen, what is skipped with one line and why, the
download committed into OUT only after the same safe load as a local file, and the run's other files.
Each test runs against loopback S3 and a path mirror."""

from __future__ import annotations

import json

import torch

from nanoresume.checkpoint import load_checkpoint, save_atomically
from nanoresume.mirror import POINTER, Pointer, find_newest_on_mirror, restore_run_files
from tests.mirror.helpers import make_checkpoint, make_checkpoint_folder, make_malicious_checkpoint, train_state


def upload_steps(mirror, folder, steps):
    for step in steps:
        mirror.upload_checkpoint(make_checkpoint(folder, step), step)


def flip_byte_on_mirror(mirror, name):
    data = bytearray(mirror.store.read(name))
    data[len(data) // 2] ^= 0xFF
    mirror.store.put_bytes(bytes(data), name)


def test_the_newest_checkpoint_is_downloaded_verified_and_committed_into_out(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    warnings: list[str] = []
    folder = tmp_path / "new" / "checkpoints"
    restored = find_newest_on_mirror(mirror, folder, warnings.append)
    assert warnings == []
    assert restored.step == 20 and restored.path == folder / "step_00000020.pt"
    assert restored.source == f"{target.url}/checkpoints/step_00000020.pt"
    assert torch.equal(load_checkpoint(restored.path)["model"]["weight"], train_state(20)["model"]["weight"])
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000020.pt"], "no temp file is left"


def test_nothing_is_downloaded_when_out_holds_the_same_step_or_a_newer_one(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    assert find_newest_on_mirror(mirror, tmp_path / "new", print, newer_than=20) is None
    assert not (tmp_path / "new").exists() or list((tmp_path / "new").iterdir()) == []


def test_a_pointer_whose_object_is_missing_falls_back_to_the_newest_good_one_with_one_line(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    mirror.write_pointer(Pointer(30, "checkpoints/step_00000030.pt", "file", 1, "0" * 64))
    warnings: list[str] = []
    restored = find_newest_on_mirror(mirror, tmp_path / "new", warnings.append)
    assert restored.step == 20
    assert len(warnings) == 1 and "step_00000030.pt" in warnings[0] and "not on the mirror" in warnings[0]


def test_an_object_with_no_pointer_naming_it_is_skipped_with_one_line(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10])
    mirror.store.put_file(make_checkpoint(tmp_path / "old" / "checkpoints", 20), "checkpoints/step_00000020.pt")
    warnings: list[str] = []
    restored = find_newest_on_mirror(mirror, tmp_path / "new", warnings.append)
    assert restored.step == 10
    assert len(warnings) == 1 and "step_00000020.pt" in warnings[0] and "never finished" in warnings[0]


def test_a_mirror_without_a_pointer_offers_nothing_and_says_so_in_one_line(target, tmp_path):
    mirror = target.open()
    mirror.store.put_file(make_checkpoint(tmp_path / "old", 10), "checkpoints/step_00000010.pt")
    warnings: list[str] = []
    assert find_newest_on_mirror(mirror, tmp_path / "new", warnings.append) is None
    assert len(warnings) == 1 and POINTER in warnings[0]


def test_a_bit_flipped_checkpoint_is_skipped_with_one_line_and_leaves_nothing_in_out(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    flip_byte_on_mirror(mirror, "checkpoints/step_00000020.pt")
    warnings: list[str] = []
    folder = tmp_path / "new" / "checkpoints"
    restored = find_newest_on_mirror(mirror, folder, warnings.append)
    assert restored.step == 10
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "checksum mismatch" in warnings[0] and f"{target.url}/checkpoints/step_00000020.pt" in warnings[0]
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000010.pt"]


def test_a_truncated_checkpoint_is_skipped(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    data = mirror.store.read("checkpoints/step_00000020.pt")
    mirror.store.put_bytes(data[: len(data) // 2], "checkpoints/step_00000020.pt")
    warnings: list[str] = []
    assert find_newest_on_mirror(mirror, tmp_path / "new", warnings.append).step == 10
    assert len(warnings) == 1 and "step_00000020.pt" in warnings[0]


def test_a_malicious_pickle_on_the_mirror_is_refused_and_never_runs(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10])
    marker = tmp_path / "MARKER"
    mirror.upload_checkpoint(make_malicious_checkpoint(tmp_path / "evil", 20, marker), 20)
    warnings: list[str] = []
    folder = tmp_path / "new" / "checkpoints"
    restored = find_newest_on_mirror(mirror, folder, warnings.append)
    assert not marker.exists(), "loading a checkpoint from the mirror ran code from its pickle"
    assert restored.step == 10
    assert len(warnings) == 1 and "refused" in warnings[0] and "step_00000020.pt" in warnings[0]
    assert not (folder / "step_00000020.pt").exists()


def test_a_folder_is_downloaded_manifest_last_and_checked_against_it(target, tmp_path):
    mirror = target.open()
    local = make_checkpoint_folder(tmp_path / "old" / "checkpoints", 10)
    mirror.upload_checkpoint(local, 10)
    folder = tmp_path / "new" / "checkpoints"
    restored = find_newest_on_mirror(mirror, folder, print)
    assert restored.path == folder / "step_00000010"
    assert {p.name: p.read_bytes() for p in restored.path.iterdir()} == \
        {p.name: p.read_bytes() for p in local.iterdir()}


def test_a_folder_without_its_manifest_or_with_a_bad_file_is_skipped(target, tmp_path):
    mirror = target.open()
    old = tmp_path / "old" / "checkpoints"
    for step in (10, 20, 30):
        mirror.upload_checkpoint(make_checkpoint_folder(old, step), step)
    mirror.store.remove("checkpoints/step_00000030/MANIFEST.sha256")
    flip_byte_on_mirror(mirror, "checkpoints/step_00000020/__1_0.distcp")
    warnings: list[str] = []
    folder = tmp_path / "new" / "checkpoints"
    assert find_newest_on_mirror(mirror, folder, warnings.append).step == 10
    assert len(warnings) == 2 and "MANIFEST" in warnings[0] and "checksum mismatch" in warnings[1]
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000010"], "no temp folder is left"


def test_the_runs_files_come_back_with_metrics_cut_after_the_resumed_step(target, tmp_path):
    mirror = target.open()
    old = tmp_path / "old"
    (old / "tb").mkdir(parents=True)
    (old / "config.json").write_text('{"max_steps": 30}')
    (old / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                                               for s in range(1, 31)))
    (old / "tb" / "events.out.tfevents.1").write_bytes(b"events")
    save_atomically({"format_version": 2, "kind": "weights", "step": 20}, old / "best.pt")
    mirror.upload_extras(old)
    new = tmp_path / "new"
    new.mkdir()
    restored = restore_run_files(mirror, new, 20, print)
    assert sorted(restored) == ["best.pt", "config.json", "metrics.jsonl", "tb/events.out.tfevents.1"]
    assert [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 21))
    assert (new / "tb" / "events.out.tfevents.1").read_bytes() == b"events"
    assert load_checkpoint(new / "best.pt")["step"] == 20
    assert restore_run_files(mirror, new, 20, print) == [], "what OUT already holds is not downloaded again"


def test_a_memory_url_works_end_to_end_as_any_fsspec_url(tmp_path):
    import uuid

    from nanoresume.mirror import Mirror
    from tests.mirror.helpers import MirrorTarget

    mirror = MirrorTarget(f"memory://nanoresume-tests/{uuid.uuid4().hex}", {}).open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10, 20])
    restored = find_newest_on_mirror(Mirror(mirror.url), tmp_path / "new", print)
    assert restored.step == 20 and load_checkpoint(restored.path)["step"] == 20


def test_the_candidates_are_the_checkpoints_up_to_the_pointer_newest_first(target, tmp_path):
    from nanoresume.mirror import mirror_candidates

    mirror = target.open()
    old = tmp_path / "old" / "checkpoints"
    upload_steps(mirror, old, [10, 20])
    mirror.store.put_file(make_checkpoint(old, 30), "checkpoints/step_00000030.pt")
    warnings: list[str] = []
    assert [(c.step, c.kind) for c in mirror_candidates(mirror, warnings.append)] == [(20, "file"), (10, "file")]
    assert len(warnings) == 1 and "step_00000030.pt" in warnings[0]


def test_a_pointer_that_names_something_outside_the_checkpoints_is_refused(target, tmp_path):
    mirror = target.open()
    upload_steps(mirror, tmp_path / "old" / "checkpoints", [10])
    mirror.store.put_bytes(json.dumps({"format": 1, "step": 10, "name": "checkpoints/../../step_00000010.pt",
                                       "kind": "file", "size": 1, "digest": ""}).encode(), POINTER)
    warnings: list[str] = []
    assert find_newest_on_mirror(mirror, tmp_path / "new", warnings.append) is None
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "not the file of step 10" in warnings[0]
