"""A kill while step checkpoints are being set aside (resuming an earlier step of a folder holding later
ones) still ends in the timeline the user chose: the intent is recorded before anything moves, the
next ``--resume auto`` honours it and the resume completes the move. Every kill point is tried, in
process, by making the k-th link, removal or rename fail."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import pytest

from nanoresume.checkpoint import (ABANDONED, CheckpointDir, CheckpointManager, load_checkpoint, resolve_resume,
                                   step_folder_path, step_path)
from nanoresume.checkpoint import sharded, stepdir
from nanoresume.trainer import Trainer
from tests.unit.test_sharded import nested_state

STEPS = [10, 20, 30, 40, 50]
CHOSEN = 20


class Killed(BaseException):
    """What a SIGKILL leaves: nothing after it runs (not even ``except Exception``)."""


def saved(folder: Path, folders: bool) -> CheckpointManager:
    manager = CheckpointManager(folder, interval=1, keep_last=10, background=False)
    for step in STEPS:
        manager.save(step, nested_state(step), sharded=folders and step % 20 == 0)  # files and folders mixed
    manager.wait()
    return manager


def count_moves(monkeypatch: pytest.MonkeyPatch, kill_after: int = -1) -> list[str]:
    """Count every link, removal and rename the set-aside makes; raise Killed before the one numbered
    ``kill_after`` (0: before the first)."""
    done: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any) -> Any:
            if len(done) == kill_after:
                raise Killed(f"killed before {name} #{len(done)}")
            result = real(*args)
            done.append(name)
            return result
        return operation

    for name in ("_link_or_move", "_remove", "_rename"):
        monkeypatch.setattr(stepdir, name, counted(name, getattr(stepdir, name)))
    return done


def load(path: Path) -> dict[str, Any]:
    if path.is_dir():
        sharded.verify_folder(path)
        return sharded.read_folder(path)
    return load_checkpoint(path)


def check_chosen_timeline(folder: Path) -> None:
    """The next start: ``auto`` picks the chosen step, its resume completes the set-aside, and every
    later checkpoint is whole in abandoned/, none left here."""
    checkpoints = CheckpointDir(folder)
    left = [s for s in checkpoints.list() if s.step > CHOSEN]
    warnings: list[str] = []
    path, state = resolve_resume("auto", checkpoints, warnings.append, load=load, accept=lambda p, s: s)
    assert state["step"] == CHOSEN, path
    assert len(warnings) == (1 if left else 0) and all(f"newer than step {CHOSEN}" in w for w in warnings), warnings
    manager = CheckpointManager(folder, interval=1, keep_last=10, background=False)
    manager.adopt(path, CHOSEN, print)
    assert [s.step for s in checkpoints.list()] == [10, 20]
    abandoned = sorted(p for p in (folder / ABANDONED).rglob("step_*") if p.parent.parent == folder / ABANDONED)
    assert sorted({int(p.name[5:13]) for p in abandoned}) == [30, 40, 50], abandoned
    for path in abandoned:
        if path.suffix != ".sha256":
            assert load(path)["step"] == int(path.name[5:13])
    assert checkpoints.pending_set_aside() is None
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("step_")) == [ABANDONED]


@pytest.mark.parametrize("folders", [False, True], ids=["files", "files-and-folders"])
def test_every_kill_point_of_a_set_aside_ends_in_the_chosen_timeline(tmp_path: Path, monkeypatch, folders: bool):
    with monkeypatch.context() as m:
        reference = saved(tmp_path / "reference", folders)
        operations = count_moves(m)
        reference.adopt(step_path(reference.folder, CHOSEN), CHOSEN, print)
    assert len(operations) >= 3, operations
    for kill_after in range(len(operations)):
        folder = tmp_path / f"killed-after-{kill_after}"
        manager = saved(folder, folders)
        chosen = step_folder_path(folder, CHOSEN) if folders else step_path(folder, CHOSEN)
        with monkeypatch.context() as m:
            count_moves(m, kill_after)
            with pytest.raises(Killed):
                manager.adopt(chosen, CHOSEN, print)
        check_chosen_timeline(folder)


def test_a_set_aside_with_nothing_to_move_leaves_no_intent(tmp_path: Path):
    manager = saved(tmp_path, folders=False)
    assert manager.dir.set_aside_after(50) == []
    assert manager.dir.pending_set_aside() is None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("step_")) == []


def test_a_trainer_killed_after_the_first_link_resumes_the_chosen_step_with_auto(reference_run, tmp_path: Path,
                                                                                 monkeypatch):
    """The outside tester's repro: ``--resume OUT/checkpoints/step_00000010.pt`` in a folder holding
    later steps, killed after the first hard link; the next ``--resume auto`` continues from 10."""
    cfg = reference_run(max_steps=30, eval_interval=10, keep_last=3).copy_to(tmp_path / "out")
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    chosen = step_path(checkpoints, 10)
    with monkeypatch.context() as m:
        count_moves(m, kill_after=1)
        with pytest.raises(Killed):
            Trainer(dataclasses.replace(cfg, resume=str(chosen), max_steps=32))
    with Trainer(dataclasses.replace(cfg, resume="auto", max_steps=32)) as trainer:
        assert trainer.resumed_from == chosen
    assert [s.step for s in CheckpointDir(checkpoints).list()] == [10]
    assert sorted(p.name for p in (checkpoints / ABANDONED / "1").glob("*.pt")) == \
        ["step_00000020.pt", "step_00000030.pt"]
