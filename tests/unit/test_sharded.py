"""Checkpoint folders in one process: the commit, the manifest, refusals of damaged or crafted
folders (none of which may run code), leftovers, and the manager's policy applied to folders."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoresume.checkpoint import (ABANDONED, CheckpointManager, CheckpointObserver, remove_unfinished, resolve_resume,
                                   step_folder_path)
from nanoresume.training_state import require_train_state
from nanoresume.checkpoint import sharded
from nanoresume.checkpoint.folders import MANIFEST, METADATA, file_sha256, manifest_digests, write_manifest
from nanoresume.errors import CheckpointError, CheckpointWriteError
from nanoresume.loading import read_state
from tests.helpers import train, train_in_pieces


def nested_state(step: int = 1) -> dict[str, Any]:
    """Tensors, plain values, None, tuples and lists, nested: what a training state holds."""
    return {"format_version": 2, "kind": "train", "step": step,
            "model": {"a.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3) * step,
                      "b": torch.arange(5)},
            "config": ({"lr": 0.1, "name": None, "betas": (0.9, 0.99)},),
            "ranks": {"0": {"rank": 0, "rng": {"torch": torch.get_rng_state(),  # a list of tensors, as on GPUs
                                               "cuda": [torch.zeros(4, dtype=torch.uint8), torch.ones(2)]}}}}


def saved_folder(tmp_path: Path, step: int = 1) -> Path:
    target = step_folder_path(tmp_path, step)
    sharded.save_folder(nested_state(step), target, token="1")
    return target


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return os.system, (f"touch {self.marker}",)


def reseal(folder: Path) -> None:
    """Recompute the manifest, as an attacker who rewrote files would: only the loader's own checks remain."""
    write_manifest(folder, {name: file_sha256(folder / name) for name in manifest_digests(folder)})


# ---- commit and round trip ----------------------------------------------------------------------


def test_a_folder_commit_leaves_the_files_a_manifest_of_their_digests_and_no_temp_folder(tmp_path):
    target = saved_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted([METADATA, MANIFEST, "__0_0.distcp"])
    digests = manifest_digests(target)
    assert digests == {name: file_sha256(target / name) for name in names if name != MANIFEST}


def test_a_folder_reads_back_every_value_and_tensor_as_saved(tmp_path, assert_same_state):
    back = sharded.read_folder(saved_folder(tmp_path, step=3))
    assert_same_state(back, nested_state(3))


def test_placeholders_give_shapes_and_dtypes_without_reading_the_tensors(tmp_path):
    back = sharded.read_folder(saved_folder(tmp_path), placeholders_under=("model",))
    weight = back["model"]["a.weight"]
    assert weight.device.type == "meta" and weight.shape == (4, 3) and weight.dtype == torch.float32
    assert back["ranks"]["0"]["rng"]["torch"].device.type == "cpu"


def test_a_failed_folder_write_leaves_no_temp_folder_and_the_earlier_checkpoint_intact(tmp_path):
    earlier = saved_folder(tmp_path, 1)

    class DiskFull(CheckpointObserver):
        def before_commit(self, target: Path) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError) as info:
        sharded.save_folder(nested_state(2), step_folder_path(tmp_path, 2), token="1", observer=DiskFull())
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [earlier.name]
    sharded.verify_folder(earlier)


# ---- refusals: one line naming the file, and never any code run -----------------------------------


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped byte"])
def test_a_damaged_shard_is_refused_in_one_line_naming_it(tmp_path, damage):
    folder = saved_folder(tmp_path)
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "missing":
        shard.unlink()
    else:
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        sharded.verify_folder(folder)
    message = str(info.value)
    assert "\n" not in message and str(shard) in message


def test_a_folder_without_its_manifest_is_refused_as_never_committed(tmp_path):
    folder = saved_folder(tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="has no MANIFEST.sha256, so its write never finished"):
        sharded.verify_folder(folder)


def test_a_metadata_pickle_that_runs_code_is_refused_even_with_a_matching_manifest(tmp_path):
    folder = saved_folder(tmp_path)
    marker = tmp_path / "marker"
    (folder / METADATA).write_bytes(pickle.dumps(RunsCode(marker)))
    reseal(folder)
    for read in (sharded.verify_folder, read_state, lambda f: sharded.read_folder(f)):
        with pytest.raises(CheckpointError) as info:
            read(folder)
        assert "refused, it asks to import posix.system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_plain_value_that_runs_code_is_refused_even_with_a_matching_manifest(tmp_path):
    """DCP's own loader reads plain values with weights_only=False."""
    folder = saved_folder(tmp_path)
    marker = tmp_path / "marker"
    metadata = sharded.read_metadata(folder / METADATA)
    index = next(i for i in metadata.storage_data if i.fqn == "step")
    shard = folder / metadata.storage_data[index].relative_path
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer)  # as DCP stores a plain value: torch.load meets it at that offset
    payload = buffer.getvalue()
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                       length=len(payload))
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    reseal(folder)
    sharded.verify_folder(folder)  # every digest matches: only the loader stands in the way
    with pytest.raises(CheckpointError, match="refused step"):
        sharded.read_folder(folder)
    assert not marker.exists()


def test_an_index_pointing_outside_its_folder_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    metadata = sharded.read_metadata(folder / METADATA)
    for index, info in metadata.storage_data.items():
        metadata.storage_data[index] = dataclasses.replace(info, relative_path="../elsewhere")
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    reseal(folder)
    with pytest.raises(CheckpointError, match="points outside its folder"):
        sharded.verify_folder(folder)


# ---- leftovers and the manager's policy ---------------------------------------------------------


def folder_manager(folder: Path, steps: list[int], keep_last: int = 10, background: bool = False) \
        -> CheckpointManager:
    manager = CheckpointManager(folder, interval=1, keep_last=keep_last, background=background)
    for step in steps:
        manager.save(step, nested_state(step), sharded=True)
    manager.wait()
    return manager


def test_unfinished_folders_are_removed_and_everything_else_is_left_alone(tmp_path):
    folder_manager(tmp_path, [5])
    unfinished = [tmp_path / ".step_00000010.tmp.123", tmp_path / ".step_00000005.deleting.9",
                  tmp_path / "step_00000010"]  # the last one: a step folder without a manifest
    for path in unfinished:
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "notes").mkdir()
    assert remove_unfinished(tmp_path) == sorted(unfinished)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_00000005"]


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_keep_last_prunes_folders_like_files_and_leaves_no_half_deleted_folder(tmp_path, background):
    manager = folder_manager(tmp_path, [1, 2, 3, 4], keep_last=2, background=background)
    assert [s.path.name for s in manager.dir.list()] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    assert manager.committed_step == 4


def test_auto_falls_back_past_a_corrupt_newest_folder_and_none_refuses_folders(tmp_path):
    manager = folder_manager(tmp_path, [1, 2])
    (step_folder_path(tmp_path, 2) / "__0_0.distcp").write_bytes(b"damaged")
    warnings: list[str] = []

    def load(path: Path) -> dict[str, Any]:
        sharded.verify_folder(path)
        return sharded.read_folder(path)

    path, state = resolve_resume("auto", manager.dir, warnings.append, load=load, accept=require_train_state)
    assert path == step_folder_path(tmp_path, 1) and state["step"] == 1
    assert len(warnings) == 1 and str(step_folder_path(tmp_path, 2) / "__0_0.distcp") in warnings[0]
    with pytest.raises(CheckpointError, match="already holds 2 checkpoint"):
        resolve_resume("none", manager.dir, print, accept=require_train_state)


def test_folders_newer_than_the_resumed_step_move_to_an_abandoned_timeline_whole(tmp_path):
    manager = folder_manager(tmp_path, [1, 2, 3])
    moved = manager.dir.set_aside_after(1)
    assert [p.name for p in moved] == ["step_00000002", "step_00000003"]
    assert all(p.parent == tmp_path / ABANDONED / "1" for p in moved)
    for path in moved:
        sharded.verify_folder(path)
    assert [s.step for s in manager.dir.list()] == [1]


def test_a_file_named_like_a_checkpoint_folder_is_an_obstacle(tmp_path):
    manager = folder_manager(tmp_path, [1])
    (tmp_path / "step_00000002").write_text("not a folder")
    with pytest.raises(CheckpointError, match="step_00000002 is a file, in the way"):
        resolve_resume("auto", manager.dir, print, accept=require_train_state)


# ---- a single process writing folders -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False], ids=["background", "sync"])
def test_a_single_process_resumed_from_folders_ends_bit_exact(make_config, assert_same_state, async_save):
    cfg = make_config(ckpt_format="sharded", async_save=async_save, eval_interval=5)
    reference, result = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-reference"))
    resumed, losses = train_in_pieces(cfg, [7, 13])
    assert losses == result.step_losses
    state, expected = resumed.state_dict(), reference.state_dict()
    for s in (state, expected):
        del s["config"]
    assert_same_state(state, expected)
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000013", "step_00000015", "step_00000020"]
    assert_same_state(read_state(checkpoints / "step_00000020")["model"], expected["model"])
