"""Atomic checksummed files, safe loading, refusals, resume resolution and retention."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from nanoresume import checkpoint
from nanoresume.checkpoint import (checksum_path, load_checkpoint, remove_leftovers,
                                   save_atomically, step_path)
from nanoresume.errors import CheckpointError, CheckpointWriteError
from nanoresume.trainer import Trainer


class WriteProgress(checkpoint.CheckpointObserver):
    """Calls ``on_bytes(written)`` after every piece of a checkpoint file write (to slow it or fail it)."""

    def __init__(self, on_bytes: Callable[[int], Any]) -> None:
        self.on_bytes = on_bytes

    def on_write_progress(self, path: Path, nbytes: int) -> None:
        self.on_bytes(nbytes)


def small_state(step: int = 1) -> dict[str, Any]:
    return {"format_version": checkpoint.FORMAT_VERSION, "kind": "train", "step": step,
            "weights": torch.arange(1000, dtype=torch.float32) * step}


def write_with_sidecar(path: Path, payload: bytes) -> None:
    """Bytes plus a *correct* checksum file, so only the loader's own checks stand in the way."""
    path.write_bytes(payload)
    checksum_path(path).write_text(f"{hashlib.sha256(payload).hexdigest()}  {path.name}\n")


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ---- round trip ---------------------------------------------------------------------------------


def test_a_trainer_checkpoint_round_trip_restores_every_key_and_tensor(make_config, tmp_path, assert_same_state):
    trainer = Trainer(make_config(max_steps=3, eval_interval=2))
    trainer.run()
    state = trainer.state_dict()
    path = tmp_path / "rt.pt"
    digest = save_atomically(state, path)
    assert checkpoint.verify_file(path).embedded == digest
    loaded = load_checkpoint(path)
    assert_same_state(state, loaded)
    assert loaded["step"] == 3 and len(loaded["optimizer"]["state"]) > 0
    assert set(loaded) >= {"format_version", "kind", "config", "data", "model", "optimizer", "scheduler",
                           "scaler", "ranks", "step", "tokens_seen", "best_val_loss"}


def test_a_checkpoint_loads_with_plain_torch_load_weights_only(make_config):
    trainer = Trainer(make_config(max_steps=2, eval_interval=2))
    result = trainer.run()
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert state["kind"] == "train" and state["step"] == 2
    assert torch.equal(state["model"]["wte.weight"], trainer.raw_model.wte.weight)


def test_save_atomically_leaves_no_temp_file_and_writes_a_sha256sum_sidecar(tmp_path):
    path = tmp_path / "step_00000001.pt"
    save_atomically(small_state(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    whole = hashlib.sha256(path.read_bytes()).hexdigest()  # what sha256sum -c checks
    assert checksum_path(path).read_text() == f"{whole}  step_00000001.pt\n"


def test_a_failed_write_raises_checkpoint_write_error_and_keeps_earlier_files(tmp_path, monkeypatch):
    good = tmp_path / "best.pt"
    save_atomically(small_state(1), good)

    def disk_full(written: int) -> None:
        if written > 100:
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_atomically(small_state(2), good, observer=WriteProgress(disk_full))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]
    assert load_checkpoint(good)["step"] == 1


def test_overwriting_best_pt_keeps_it_verifiable_with_only_the_new_digest(tmp_path):
    best = tmp_path / "best.pt"
    save_atomically(small_state(1), best)
    save_atomically(small_state(2), best)
    assert checkpoint.accepted_digests(checksum_path(best)) == [hashlib.sha256(best.read_bytes()).hexdigest()]
    assert load_checkpoint(best)["step"] == 2


# ---- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "step_00000001.pt"
    save_atomically(small_state(), path)
    return path


def test_a_truncated_file_is_refused_as_corrupt(good_file):
    good_file.write_bytes(good_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good_file)
    assert "checksum mismatch" in assert_one_line_naming(info, good_file)


def test_one_flipped_bit_in_the_tensor_data_is_refused(good_file):
    payload = bytearray(good_file.read_bytes())
    middle = len(payload) // 2
    payload[middle] ^= 0x01
    good_file.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good_file)
    assert "corrupt" in assert_one_line_naming(info, good_file)


def test_a_zero_length_file_is_refused(good_file):
    good_file.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good_file)
    assert "empty" in assert_one_line_naming(info, good_file)


def test_an_older_file_without_an_embedded_digest_is_refused_without_its_sidecar(tmp_path):
    path = tmp_path / "step_00000001.pt"
    buffer = io.BytesIO()
    torch.save(small_state(), buffer)  # a plain torch.save file: what nanoresume wrote before digests were embedded
    write_with_sidecar(path, buffer.getvalue())
    assert load_checkpoint(path)["step"] == 1
    checksum_path(path).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "step_00000001.pt.sha256" in assert_one_line_naming(info, path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "no such" in assert_one_line_naming(info, tmp_path / "nope.pt")


@pytest.mark.parametrize("payload", [b"hello, I am a text file\n", bytes(range(256)) * 40,
                                     b"PK\x03\x04 not really a zip"])
def test_a_file_that_is_not_a_checkpoint_is_refused_even_with_a_valid_sidecar(tmp_path, payload):
    path = tmp_path / "x.pt"
    write_with_sidecar(path, payload)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert_one_line_naming(info, path)


@pytest.mark.parametrize("obj", [{"weights": torch.ones(3)}, [torch.ones(3)], torch.ones(3),
                                 {"format_version": 1}])
def test_a_valid_torch_file_that_is_not_a_nanoresume_dict_is_refused(tmp_path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "other.pt"
    write_with_sidecar(path, buffer.getvalue())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "not a nanoresume checkpoint" in assert_one_line_naming(info, path)


def test_a_checkpoint_from_a_newer_format_is_refused_with_upgrade_advice(tmp_path):
    path = tmp_path / "new.pt"
    save_atomically({**small_state(), "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "upgrade" in assert_one_line_naming(info, path)


class _TouchOnLoad:
    """Unpickling this calls Path.touch(marker): the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_malicious_pickle_with_a_correct_checksum_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    buffer = io.BytesIO()
    torch.save({"format_version": 1, "kind": "train", "payload": _TouchOnLoad(marker)}, buffer)
    assert not marker.exists()
    path = tmp_path / "step_00000009.pt"
    write_with_sidecar(path, buffer.getvalue())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "refused" in assert_one_line_naming(info, path)
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"
    # The exploit is real: the unsafe loader does run it.
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()


# ---- leftovers --------------------------------------------------------------------------------


def test_remove_leftovers_deletes_temp_files_and_orphan_sidecars_but_nothing_else(tmp_path):
    save_atomically(small_state(10), step_path(tmp_path, 10))
    leftovers = [".step_00000020.pt.tmp.123", ".step_00000020.pt.sha256.tmp.123", ".best.pt.tmp.77",
                 ".config.json.tmp.5", "step_00000030.pt.sha256", "best.pt.sha256"]
    unrelated = ["notes.txt", "step_00000040.pt.bak", ".hidden", "mystep_00000050.pt.sha256",
                 ".other.pt.tmp.1", "config.json"]
    for name in leftovers + unrelated:
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(tmp_path, owned=("best.pt", "config.json"))
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        unrelated + ["step_00000010.pt", "step_00000010.pt.sha256"])
    assert load_checkpoint(step_path(tmp_path, 10))["step"] == 10


def test_random_bytes_are_reported_as_not_a_checkpoint_rather_than_as_unsafe_code(tmp_path):
    path = tmp_path / "noise.pt"
    write_with_sidecar(path, bytes(range(256)) * 40)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "could run code" not in str(info.value)


# ---- files that verify on their own ----------------------------------------------------------------


def test_a_lone_renamed_copy_without_its_sidecar_loads(good_file, tmp_path):
    lone = tmp_path / "elsewhere" / "shared weights.pt"
    lone.parent.mkdir()
    lone.write_bytes(good_file.read_bytes())
    assert load_checkpoint(lone)["step"] == 1
    assert checkpoint.verify_file(lone).self_consistent


def test_the_file_is_still_a_zip_torch_loads_and_its_sidecar_matches_the_whole_file(good_file):
    with zipfile.ZipFile(good_file) as archive:
        assert "archive/data.pkl" in archive.namelist()
        assert archive.comment.startswith(checkpoint.fileformat.MAGIC)
        # torch's per-record CRC-32s are left out (the SHA-256 covers every byte): all zero.
        assert {info.CRC for info in archive.infolist()} == {0}
    whole = hashlib.sha256(good_file.read_bytes()).hexdigest()
    assert checksum_path(good_file).read_text() == f"{whole}  {good_file.name}\n"
    assert torch.load(good_file, weights_only=True)["step"] == 1


@pytest.mark.parametrize("damage", ["flip a byte of tensor data", "truncate by one byte", "drop the trailer"])
def test_a_damaged_lone_file_is_refused_with_one_line(good_file, tmp_path, damage):
    payload = bytearray(good_file.read_bytes())
    if damage == "flip a byte of tensor data":
        start = bytes(payload).index(torch.arange(1000, dtype=torch.float32).numpy().tobytes()[:64])
        payload[start + 100] ^= 0x40
    elif damage == "truncate by one byte":
        payload = payload[:-1]
    else:
        payload = payload[:-84]
    lone = tmp_path / "lone.pt"
    lone.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(lone)
    assert_one_line_naming(info, lone)


def test_the_bytes_that_are_checked_are_the_bytes_that_are_loaded(good_file, tmp_path, monkeypatch):
    """A different (valid) checkpoint swapped onto the name between the hash and the unpickling
    must not be what comes back."""
    impostor = tmp_path / "impostor.pt"
    save_atomically(small_state(step=7), impostor)
    real_digests = checkpoint.files.digests

    def digests_then_swap(data):
        found = real_digests(data)
        os.replace(impostor, good_file)  # the swap lands after the check
        return found

    monkeypatch.setattr(checkpoint.files, "digests", digests_then_swap)
    state = load_checkpoint(good_file)
    assert state["step"] == 1
    assert torch.equal(state["weights"], small_state(step=1)["weights"])


def test_an_os_system_payload_is_named_as_unsafe_in_the_installed_torchs_own_words(tmp_path):
    marker = tmp_path / "MARKER"
    buffer = io.BytesIO()
    torch.save({"format_version": 1, "kind": "train", "payload": _SystemOnLoad(f"touch {marker}")}, buffer)
    path = tmp_path / "step_00000009.pt"
    write_with_sidecar(path, buffer.getvalue())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = assert_one_line_naming(info, path)
    assert "could run code" in message and "system" in message
    assert not marker.exists()


class _SystemOnLoad:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---- writes that fail ---------------------------------------------------------------------------


class _RefusesToPickle:
    def __reduce__(self):
        raise TypeError("cannot pickle this handle")


def test_a_value_that_cannot_be_serialized_is_one_line_that_keeps_its_cause(tmp_path):
    path = tmp_path / "best.pt"
    save_atomically(small_state(1), path)
    with pytest.raises(CheckpointWriteError) as info:
        save_atomically({**small_state(2), "extra": _RefusesToPickle()}, path)
    message = str(info.value)
    assert "\n" not in message and "could not serialize" in message and "cannot pickle this handle" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]
    assert load_checkpoint(path)["step"] == 1


def test_running_out_of_memory_inside_the_write_says_so_in_one_line(tmp_path, monkeypatch):
    def out_of_memory(written: int) -> None:
        if written > 100:
            raise MemoryError()

    with pytest.raises(CheckpointWriteError, match="out of memory while serializing") as info:
        save_atomically(small_state(), tmp_path / "step_00000001.pt", observer=WriteProgress(out_of_memory))
    assert "enforce fail" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_the_way_of_a_checkpoint_name_is_named_rather_than_blamed_on_the_disk(tmp_path):
    (tmp_path / "step_00000025.pt").mkdir()
    with pytest.raises(CheckpointWriteError) as info:
        save_atomically(small_state(), step_path(tmp_path, 25))
    message = str(info.value)
    assert "is a folder" in message and "free some space" not in message


def test_the_digest_is_a_tree_of_8_mib_chunks_that_anyone_can_recompute(tmp_path):
    """Multi-chunk files: written and checked in pieces on several threads, the digest is still the
    documented function of the bytes (SHA-256 of a header, the length and each chunk's SHA-256)."""
    path = tmp_path / "big.pt"
    save_atomically({"format_version": 2, "kind": "train", "x": torch.arange(5_000_000, dtype=torch.float32)}, path)
    data = path.read_bytes()
    covered = data[:-checkpoint.fileformat.TRAILER_LEN]
    chunk = checkpoint.fileformat.CHUNK
    assert len(covered) > 2 * chunk
    root = hashlib.sha256(b"nanoresume sha256 tree v1\0" + len(covered).to_bytes(8, "little"))
    for start in range(0, len(covered), chunk):
        root.update(hashlib.sha256(covered[start:start + chunk]).digest())
    assert data.endswith(root.hexdigest().encode())
    assert checkpoint.verify_file(path).self_consistent
