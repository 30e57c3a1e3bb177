"""What a resumed run may and may not change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nanoresume.checkpoint import load_checkpoint, step_path
from nanoresume.errors import CheckpointError
from nanoresume.trainer import Trainer
from nanoresume.tools import cli
from tests.helpers import LossRecorder, flip_a_byte, run_main, stop_after, train


@pytest.fixture
def finished(reference_run, tmp_path):
    """A finished 10-step run (a copy of one trained once per session); returns its config."""
    return reference_run(max_steps=10, eval_interval=5).copy_to(tmp_path / "out")


def test_resuming_with_a_different_n_embd_names_the_field_and_both_values(finished):
    with pytest.raises(CheckpointError) as info:
        Trainer(dataclasses.replace(finished, resume="auto", n_embd=64))
    message = str(info.value)
    assert "--n-embd is 32 in the checkpoint but 64 now" in message
    assert "\n" not in message


def test_resuming_on_different_data_names_the_fingerprint(finished, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(Path(finished.data).read_text().upper())
    with pytest.raises(CheckpointError) as info:
        Trainer(dataclasses.replace(finished, resume="auto", data=str(other)))
    assert "fingerprint" in str(info.value) and "--data" in str(info.value)


def test_the_same_data_under_another_path_resumes(finished, tmp_path):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(Path(finished.data).read_bytes())
    recorder = LossRecorder()
    trainer = Trainer(dataclasses.replace(finished, resume="auto", data=str(copy), max_steps=12), on_step=recorder)
    assert trainer.resumed_from == step_path(Path(finished.out_dir) / "checkpoints", 10)
    result = trainer.run()
    assert result.step == 12 and [s for s, _ in recorder.losses] == [11, 12]  # steps 1-10 not trained again


def test_a_larger_max_steps_continues_training_from_where_it_stopped(finished):
    recorder = LossRecorder()
    trainer = Trainer(dataclasses.replace(finished, resume="auto", max_steps=15), on_step=recorder)
    assert trainer.counters.step == 10
    result = trainer.run()
    assert [s for s, _ in recorder.losses] == list(range(11, 16))
    assert result.exit_code == 0 and result.step == 15
    assert sorted(p.name for p in (Path(finished.out_dir) / "checkpoints").glob("*.pt"))[-1] == "step_00000015.pt"


def test_resuming_a_finished_run_without_raising_max_steps_trains_nothing(finished, capsys):
    _, result = train(dataclasses.replace(finished, resume="auto"))
    assert result.step == 10 and result.step_losses == []
    assert "nothing to do" in capsys.readouterr().out


def test_resume_none_on_a_folder_with_checkpoints_refuses_and_leaves_them_alone(finished):
    folder = Path(finished.out_dir) / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointError, match="--resume auto"):
        Trainer(dataclasses.replace(finished, resume="none"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_second_trainer_on_the_same_out_dir_is_refused_while_the_first_holds_it(make_config):
    from nanoresume.errors import UserError

    cfg = make_config(max_steps=2)
    with Trainer(cfg):
        with pytest.raises(UserError, match="another training run"):
            Trainer(dataclasses.replace(cfg, resume="auto"))


def test_an_out_dir_that_is_a_file_is_refused_naming_out_dir(make_config, tmp_path):
    from nanoresume.errors import UserError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="--out-dir"):
        Trainer(make_config(out_dir=str(blocker)))


def test_a_stop_before_the_first_step_does_not_claim_a_checkpoint_it_never_wrote(make_config, capsys):
    from nanoresume.signals import StopFlag

    cfg = make_config(max_steps=5)
    stop = StopFlag()
    stop.request("test", 99)
    result = Trainer(cfg, stop=stop).run()
    assert result.step == 0 and result.exit_code == 99
    [stopped] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped by")]
    claimed = [word.strip("'\".,;") for word in stopped.split() if ".pt" in word]
    # It names exactly the file it wrote, step 0's checkpoint, and that file is really there.
    assert claimed == [str(step_path(Path(cfg.out_dir) / "checkpoints", 0))], stopped
    assert load_checkpoint(Path(claimed[0]))["step"] == 0


def test_a_corrupt_newest_checkpoint_is_set_aside_and_retention_never_deletes_the_good_ones(
        make_config, tmp_path, capsys):
    cfg = make_config(max_steps=30, eval_interval=10, keep_last=2)
    Trainer(cfg, on_step=stop_after(20)).run()
    folder = Path(cfg.out_dir) / "checkpoints"
    flip_a_byte(step_path(folder, 20))

    resumed = Trainer(dataclasses.replace(cfg, resume="auto"))
    assert resumed.counters.step == 10
    assert resumed.run().step == 30
    warnings = capsys.readouterr().err
    assert "skipping" in warnings and "step_00000020.pt" in warnings and "abandoned" in warnings
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_00000020.pt", "step_00000030.pt"]
    assert load_checkpoint(step_path(folder, 20))["step"] == 20  # the new timeline's step 20, valid
    assert (folder / "abandoned" / "1" / "step_00000020.pt").is_file()  # the corrupt one, kept for a look

    straight = dataclasses.replace(cfg, out_dir=str(tmp_path / "straight"))
    Trainer(straight).run()
    expected = load_checkpoint(step_path(Path(straight.out_dir) / "checkpoints", 30))
    got = load_checkpoint(step_path(folder, 30))
    assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])


def test_keep_last_1_keeps_the_checkpoint_just_written(make_config):
    cfg = make_config(max_steps=30, eval_interval=10, keep_last=1)
    Trainer(cfg).run()
    names = sorted(p.name for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000030.pt"]


def test_switching_to_float16_on_resume_starts_a_new_scaler_with_a_warning(finished, capsys):
    trainer = Trainer(dataclasses.replace(finished, resume="auto", dtype="float16", max_steps=12))
    assert trainer.scaler.is_enabled()
    assert "warning: the checkpoint was not trained in float16: starting a new gradient scaler" in \
        capsys.readouterr().err
    assert trainer.run().step == 12


def test_a_new_seed_on_resume_is_reported_as_having_no_effect(finished, capsys):
    with Trainer(dataclasses.replace(finished, resume="auto", seed=7)):
        pass
    assert "--seed: 1337 -> 7 (no effect" in capsys.readouterr().out


@pytest.mark.slow
def test_flags_given_on_resume_are_validated_against_the_checkpoint_not_the_preset(make_config, tmp_path, capsys):
    # n_embd 36 with 6 heads is valid; the cpu preset's 64 would not divide by 6.
    cfg = make_config(max_steps=10, n_embd=36, n_head=6)
    assert Trainer(cfg).run().exit_code == 0
    resumed = run_main(cli.main, ["--out-dir", cfg.out_dir, "--resume", "auto", "--n-head", "6",
                                  "--max-steps", "12", "--no-progress"], capsys)  # train.py, in-process
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr == ""  # no error line, no warning
    lines = resumed.stdout.splitlines()
    assert lines[:2] == ["changed on resume: --max-steps: 10 -> 12",  # --n-head 6 is no change
                         f"resumed from {step_path(Path(cfg.out_dir) / 'checkpoints', 10)} at step 10"], lines
    assert lines[-1].startswith("finished: 12 steps"), lines
