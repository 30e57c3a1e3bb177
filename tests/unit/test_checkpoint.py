"""Atomic checksummed files, safe loading, refusals, resume resolution and retention."""

from __future__ import annotations

import hashlib
import io
import pathlib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoresume import checkpoint
from nanoresume.checkpoint import (CheckpointManager, checksum_path, load_checkpoint, remove_leftovers,
                                   resolve_resume, save_atomically, step_path)
from nanoresume.errors import CheckpointError, CheckpointWriteError
from nanoresume.trainer import Trainer


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
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
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
    digest = save_atomically(small_state(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    assert checksum_path(path).read_text() == f"{digest}  step_00000001.pt\n"


def test_a_failed_write_raises_checkpoint_write_error_and_keeps_earlier_files(tmp_path, monkeypatch):
    good = tmp_path / "best.pt"
    save_atomically(small_state(1), good)

    def disk_full(written: int) -> None:
        if written > 100:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "testing_write_hook", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_atomically(small_state(2), good)
    monkeypatch.setattr(checkpoint, "testing_write_hook", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]
    assert load_checkpoint(good)["step"] == 1


def test_overwriting_best_pt_keeps_it_verifiable_with_only_the_new_digest(tmp_path):
    best = tmp_path / "best.pt"
    save_atomically(small_state(1), best)
    digest = save_atomically(small_state(2), best)
    assert checkpoint.accepted_digests(checksum_path(best)) == [digest]
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


def test_a_file_without_its_sha256_sidecar_is_refused(good_file):
    checksum_path(good_file).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good_file)
    assert "step_00000001.pt.sha256" in assert_one_line_naming(info, good_file)


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


# ---- resume resolution --------------------------------------------------------------------------


def manager_with_steps(folder: Path, steps: list[int], keep_last: int = 10) -> CheckpointManager:
    manager = CheckpointManager(folder, interval=1, keep_last=keep_last)
    for step in steps:
        manager.save(step, small_state(step))
    return manager


def test_auto_resumes_from_the_newest_checkpoint(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2, 3])
    warnings: list[str] = []
    path, state = resolve_resume("auto", manager, warnings.append)
    assert path == step_path(tmp_path, 3) and state["step"] == 3
    assert warnings == []


def test_auto_falls_back_past_a_corrupt_newest_file_with_one_warning_naming_it(tmp_path):
    manager = manager_with_steps(tmp_path, [1, 2, 3])
    newest = step_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:50])
    warnings: list[str] = []
    path, state = resolve_resume("auto", manager, warnings.append)
    assert path == step_path(tmp_path, 2) and state["step"] == 2
    assert len(warnings) == 1 and str(newest) in warnings[0]


def test_auto_returns_none_on_an_empty_or_missing_folder_and_when_nothing_verifies(tmp_path):
    warnings: list[str] = []
    assert resolve_resume("auto", CheckpointManager(tmp_path / "missing", 1, 3), warnings.append) is None
    (tmp_path / "empty").mkdir()
    assert resolve_resume("auto", CheckpointManager(tmp_path / "empty", 1, 3), warnings.append) is None
    assert warnings == []
    manager = manager_with_steps(tmp_path / "bad", [1])
    checksum_path(step_path(tmp_path / "bad", 1)).unlink()
    assert resolve_resume("auto", manager, warnings.append) is None
    assert len(warnings) == 1


def test_none_refuses_when_checkpoints_exist_pointing_at_resume_auto_and_out_dir(tmp_path):
    manager = manager_with_steps(tmp_path, [4])
    with pytest.raises(CheckpointError) as info:
        resolve_resume("none", manager, print)
    message = str(info.value)
    assert "--resume auto" in message and "--out-dir" in message and "step_00000004.pt" in message
    assert resolve_resume("none", CheckpointManager(tmp_path / "fresh", 1, 3), print) is None


def test_an_explicit_path_must_exist_and_load(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), CheckpointManager(tmp_path, 1, 3), print)
    manager = manager_with_steps(tmp_path, [1, 2])
    path, state = resolve_resume(str(step_path(tmp_path, 1)), manager, print)
    assert state["step"] == 1


def test_an_explicit_path_to_inference_weights_is_refused(tmp_path):
    best = tmp_path / "best.pt"
    save_atomically({"format_version": 1, "kind": "weights", "model": {}}, best)
    with pytest.raises(CheckpointError, match="not a full training state"):
        resolve_resume(str(best), CheckpointManager(tmp_path, 1, 3), print)


# ---- retention and leftovers --------------------------------------------------------------------


def test_keep_last_keeps_exactly_the_newest_k_step_files_and_never_best_pt(tmp_path):
    save_atomically(small_state(0), tmp_path / "best.pt")
    manager = manager_with_steps(tmp_path, [10, 20, 30, 40, 50], keep_last=2)
    assert [s.step for s in manager.list()] == [40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "best.pt.sha256",
        "step_00000040.pt", "step_00000040.pt.sha256", "step_00000050.pt", "step_00000050.pt.sha256"]


def test_step_names_are_zero_padded_so_name_order_is_step_order(tmp_path):
    manager = manager_with_steps(tmp_path, [9, 10, 100000000])
    assert [s.step for s in manager.list()] == [9, 10, 100000000]
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == [s.path.name for s in manager.list()]


def test_maybe_save_writes_on_the_interval_when_forced_and_never_twice_for_one_step(tmp_path):
    manager = CheckpointManager(tmp_path, interval=5, keep_last=10)
    built: list[int] = []

    def build(step: int):
        return lambda: built.append(step) or small_state(step)

    for step in range(1, 12):
        manager.maybe_save(step, build(step))
    assert built == [5, 10]
    assert manager.maybe_save(10, build(10), force=True) is None  # already saved
    assert manager.maybe_save(11, build(11), force=True) == step_path(tmp_path, 11)
    assert built == [5, 10, 11]


def test_remove_leftovers_deletes_temp_files_and_orphan_sidecars_but_nothing_else(tmp_path):
    manager_with_steps(tmp_path, [10])
    leftovers = [".step_00000020.pt.tmp.123", ".step_00000020.pt.sha256.tmp.123", ".best.pt.tmp.77",
                 ".config.json.tmp.5", "step_00000030.pt.sha256", "best.pt.sha256"]
    unrelated = ["notes.txt", "step_00000040.pt.bak", ".hidden", "mystep_00000050.pt.sha256",
                 ".other.pt.tmp.1", "config.json"]
    for name in leftovers + unrelated:
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(tmp_path)
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
