"""Checkpointer, the checkpoint core for loops of your own: save when due, resume exactly, keep the newest,
skip what does not verify, in the background or not."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from nanoresume import CheckpointError, Checkpointer, ResumableSampler, StopFlag, first_difference, load_checkpoint
from nanoresume.checkpoint import step_path
from tests.helpers import flip_a_byte


class Loop:
    """A small model with dropout, its optimizer, scheduler and data order: everything a resume needs."""

    def __init__(self, folder: Path, background: bool = False, **options) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3)
        self.sampler = ResumableSampler(32, batch_size=4, seed=5)
        self.data = torch.linspace(-1, 1, 32 * 4).reshape(32, 4)
        self.warnings: list[str] = []
        self.checkpoints = Checkpointer(folder, {"model": self.model, "optimizer": self.optimizer,
                                                "scheduler": self.scheduler, "sampler": self.sampler},
                                        every=2, keep_last=2, background=background, warn=self.warnings.append,
                                        **options)

    def train(self, start: int, stop: int) -> list[float]:
        losses = []
        for step in range(start, stop):
            x = self.data[self.sampler.batch(step)]
            loss = self.model(x).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.item())
            self.checkpoints.save(step + 1)
        return losses

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "background"])
def test_a_loop_resumed_from_its_checkpoint_continues_bit_for_bit(tmp_path, background):
    reference = Loop(tmp_path / "reference", background)
    expected = reference.train(0, 10)
    reference.checkpoints.close()

    first = Loop(tmp_path / "cut", background)
    losses = first.train(0, 7)  # the newest checkpoint is step 6: step 7 is lost, as after a kill
    first.checkpoints.close()
    random.random(), torch.rand(3)  # the new process's streams start elsewhere

    resumed = Loop(tmp_path / "cut", background)
    assert resumed.checkpoints.resume("auto") == 6
    losses = losses[:6] + resumed.train(6, 10)
    resumed.checkpoints.close()
    assert losses == expected
    assert first_difference(resumed.state(), reference.state()) is None


def test_only_the_newest_keep_last_checkpoints_stay_and_a_resumed_step_is_not_saved_twice(tmp_path):
    loop = Loop(tmp_path)
    loop.train(0, 8)
    loop.checkpoints.wait()  # pruning follows each commit on a thread of its own
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000006.pt", "step_00000008.pt"]
    again = Loop(tmp_path)
    assert again.checkpoints.resume("auto") == 8
    assert again.checkpoints.save(8, force=True) is False
    assert load_checkpoint(step_path(tmp_path, 8))["kind"] == "state"


def test_auto_skips_a_corrupt_newest_checkpoint_with_a_warning_and_sets_it_aside(tmp_path):
    Loop(tmp_path).train(0, 8)
    flip_a_byte(step_path(tmp_path, 8))
    loop = Loop(tmp_path)
    assert loop.checkpoints.resume("auto") == 6
    assert any("step_00000008.pt" in w and "checksum" in w for w in loop.warnings), loop.warnings
    assert not step_path(tmp_path, 8).exists()  # moved to abandoned/: a later auto never picks it


def test_none_refuses_a_folder_that_holds_checkpoints_and_a_fresh_folder_starts_at_zero(tmp_path):
    assert Loop(tmp_path / "new").checkpoints.resume("auto") == 0
    Loop(tmp_path / "old").train(0, 2)
    with pytest.raises(CheckpointError, match="already holds 1 checkpoint"):
        Loop(tmp_path / "old").checkpoints.resume("none")


def test_a_refusal_speaks_of_the_library_not_of_command_line_flags(tmp_path):
    Loop(tmp_path).train(0, 2)
    with pytest.raises(CheckpointError) as info:
        Loop(tmp_path).checkpoints.resume("none")
    assert "--" not in str(info.value) and "nanoresume.tools" not in str(info.value)


@pytest.mark.parametrize("world_size", [2, 8])
def test_under_torchrun_it_refuses_in_one_line_naming_world_size_and_touches_nothing(tmp_path, monkeypatch,
                                                                                     world_size):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(CheckpointError) as info:
        Loop(tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and f"WORLD_SIZE={world_size}" in message and "single process" in message
    assert not (tmp_path / "run").exists()


def test_torchrun_with_one_process_is_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    loop = Loop(tmp_path)
    loop.train(0, 2)
    assert loop.checkpoints.committed_step == 2


def test_build_state_holds_the_step_every_object_and_the_random_streams(tmp_path):
    loop = Loop(tmp_path)
    state = loop.checkpoints.build_state(7)
    assert state["step"] == 7 and state["kind"] == "state"
    assert set(state["objects"]) == {"model", "optimizer", "scheduler", "sampler"} and "rng" in state
    assert list(tmp_path.iterdir()) == []  # building the state saves nothing


def test_a_checkpoint_without_one_of_the_objects_is_refused_naming_it(tmp_path):
    Loop(tmp_path).train(0, 2)
    loop = Loop(tmp_path)
    loop.checkpoints.objects["ema"] = nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match="holds no state for ema"):
        loop.checkpoints.resume(str(step_path(tmp_path, 2)))


def test_the_stop_flag_learns_each_committed_step_for_a_forced_exit_to_name(tmp_path):
    stop = StopFlag()
    loop = Loop(tmp_path, background=True, stop=stop)
    loop.train(0, 4)
    loop.checkpoints.wait()
    assert stop.last_committed_step == 4 == loop.checkpoints.committed_step


def test_without_the_random_streams_a_resume_with_dropout_is_caught_differing(tmp_path):
    reference = Loop(tmp_path / "reference", rng=False)
    expected = reference.train(0, 10)
    first = Loop(tmp_path / "cut", rng=False)
    losses = first.train(0, 6)
    torch.rand(3)  # the streams a new process would start with are not the ones the first one left
    resumed = Loop(tmp_path / "cut", rng=False)
    assert resumed.checkpoints.resume("auto") == 6
    assert losses + resumed.train(6, 10) != expected
    assert first_difference(resumed.state(), reference.state()) is not None


def test_the_ckpt_tool_lists_verifies_shows_and_diffs_checkpointer_files(tmp_path, capsys):
    from nanoresume.tools import ckpt

    loop = Loop(tmp_path / "checkpoints")
    loop.train(0, 6)  # keeps steps 4 and 6
    loop.checkpoints.close()  # pruning done
    assert ckpt.main(["list", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "       6              -         -" in listed and "would pick: step_00000006.pt" in listed
    assert ckpt.main(["verify", str(tmp_path)]) == 0
    assert "2 of 2 checkpoint(s) verify" in capsys.readouterr().out
    assert ckpt.main(["show", str(step_path(tmp_path / "checkpoints", 6))]) == 0
    shown = capsys.readouterr().out
    assert "step 6" in shown and "objects: model, optimizer, scheduler, sampler" in shown
    assert "2.weight" in shown and "(1, 8)" in shown and "rng streams: python, numpy, torch" in shown
    four, six = (str(step_path(tmp_path / "checkpoints", step)) for step in (4, 6))
    assert ckpt.main(["diff", six, six]) == 0
    assert ckpt.main(["diff", four, six]) == 1
    assert "objects.model.0.weight: max abs diff" in capsys.readouterr().out


def test_the_ckpt_tool_refuses_a_corrupt_checkpointer_file_and_exporting_one(tmp_path, capsys):
    from nanoresume.tools import ckpt

    loop = Loop(tmp_path / "checkpoints")
    loop.train(0, 6)
    loop.checkpoints.close()
    six = step_path(tmp_path / "checkpoints", 6)
    assert ckpt.main(["export", str(six), "--to", str(tmp_path / "w.pt")]) == 2
    assert "holds your objects (model, optimizer, scheduler, sampler)" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()
    flip_a_byte(six)
    assert ckpt.main(["list", str(tmp_path)]) == 1
    listed = capsys.readouterr().out
    assert "BAD: " in listed and "checksum mismatch" in listed and "would pick: step_00000004.pt" in listed
    assert ckpt.main(["verify", str(six)]) == 1


def test_the_gpt_tools_name_a_checkpointer_file_for_what_it_is(tmp_path):
    from nanoresume.loading import load_valid

    Loop(tmp_path).train(0, 2)
    with pytest.raises(CheckpointError, match="written by nanoresume.Checkpointer for a loop of your own"):
        load_valid(step_path(tmp_path, 2))


def test_a_checkpoint_pruned_while_the_tool_lists_or_verifies_a_run_is_gone_not_bad(tmp_path, capsys, monkeypatch):
    from nanoresume.tools import ckpt

    loop = Loop(tmp_path / "checkpoints")
    loop.train(0, 6)
    loop.checkpoints.close()
    oldest = step_path(tmp_path / "checkpoints", 4)
    read_any = ckpt.read_any

    def pruned_first(path, tensors=True):  # a run still training prunes it between listing and reading
        if path == oldest:
            oldest.unlink(missing_ok=True)
        return read_any(path, tensors)

    monkeypatch.setattr(ckpt, "read_any", pruned_first)
    assert ckpt.main(["list", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "gone: removed while this command ran" in listed and "would pick: step_00000006.pt" in listed

    oldest.write_bytes(step_path(tmp_path / "checkpoints", 6).read_bytes())  # back, to be pruned again
    assert ckpt.main(["verify", str(tmp_path)]) == 0
    verified = capsys.readouterr().out
    assert f"gone {oldest}" in verified and "1 of 1 checkpoint(s) verify; 1 removed" in verified

    oldest.write_bytes(step_path(tmp_path / "checkpoints", 6).read_bytes())
    assert ckpt.main(["verify", str(oldest)]) == 1  # a file asked for by name must verify: gone is BAD
    assert "BAD" in capsys.readouterr().out


def test_a_resume_into_a_model_of_another_shape_names_the_tensor_and_both_shapes_and_loads_nothing(tmp_path):
    Loop(tmp_path).train(0, 2)
    for mode in ("auto", str(step_path(tmp_path, 2))):
        loop = Loop(tmp_path)
        wider = nn.Sequential(nn.Linear(4, 9), nn.Dropout(0.5), nn.Linear(9, 1))
        before = {k: v.clone() for k, v in wider.state_dict().items()}
        loop.checkpoints.objects["model"] = wider
        with pytest.raises(CheckpointError) as info:
            loop.checkpoints.resume(mode)
        message = str(info.value)
        assert "\n" not in message and "model" in message and "0.weight" in message, message
        assert "(8, 4)" in message and "(9, 4)" in message, message
        assert first_difference(wider.state_dict(), before) is None and loop.scheduler.last_epoch == 0
        assert step_path(tmp_path, 2).exists()  # nothing was set aside


def test_a_resume_into_a_model_with_other_parameter_names_says_which_in_one_line(tmp_path):
    Loop(tmp_path).train(0, 2)
    loop = Loop(tmp_path)
    loop.checkpoints.objects["model"] = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1),
                                                      nn.Linear(1, 1))
    with pytest.raises(CheckpointError) as info:
        loop.checkpoints.resume("auto")
    assert "\n" not in str(info.value) and "3.weight" in str(info.value), str(info.value)


@pytest.mark.parametrize("step", [-5, 10 ** 30])
def test_a_checkpointer_file_with_a_step_out_of_bounds_is_refused_naming_the_bound(tmp_path, step):
    from nanoresume.checkpoint import save_atomically

    Loop(tmp_path / "run").train(0, 2)
    state = load_checkpoint(step_path(tmp_path / "run", 2))
    state["step"] = step
    save_atomically(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"'step' is .*, not a step number in \[0, 2\*\*62 - 1\]"):
        Loop(tmp_path / "other").checkpoints.resume(str(tmp_path / "bad.pt"))


class History:
    """An object whose state is a tensor that grows as it runs: its shape is no misfit."""

    def __init__(self) -> None:
        self.seen = torch.zeros(0)

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"].clone()


def test_an_object_whose_tensors_grow_resumes_with_the_saved_ones(tmp_path):
    history = History()
    history.seen = torch.arange(5.0)
    with Checkpointer(tmp_path, {"history": history}, every=1, background=False) as checkpoints:
        checkpoints.save(1)
    fresh = History()
    assert Checkpointer(tmp_path, {"history": fresh}, every=1, background=False).resume("auto") == 1
    assert torch.equal(fresh.seen, torch.arange(5.0))
