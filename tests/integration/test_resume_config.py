"""What a resumed run may and may not change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nanoresume.errors import CheckpointError
from nanoresume.trainer import Trainer


@pytest.fixture
def finished(make_config):
    """A finished 10-step run; returns its config."""
    cfg = make_config(max_steps=10, eval_interval=5)
    Trainer(cfg).run()
    return cfg


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
    trainer = Trainer(dataclasses.replace(finished, resume="auto", data=str(copy), max_steps=12))
    assert trainer.run().step == 12


def test_a_larger_max_steps_continues_training_from_where_it_stopped(finished):
    trainer = Trainer(dataclasses.replace(finished, resume="auto", max_steps=15))
    assert trainer.progress.step == 10
    result = trainer.run()
    assert [s for s, _ in result.step_losses] == list(range(11, 16))
    assert result.exit_code == 0 and result.step == 15
    assert sorted(p.name for p in (Path(finished.out_dir) / "checkpoints").glob("*.pt"))[-1] == "step_00000015.pt"


def test_resuming_a_finished_run_without_raising_max_steps_trains_nothing(finished, capsys):
    result = Trainer(dataclasses.replace(finished, resume="auto")).run()
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
    first = Trainer(cfg)
    try:
        with pytest.raises(UserError, match="another training run"):
            Trainer(dataclasses.replace(cfg, resume="auto"))
    finally:
        first.run_dir.close()


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
    out = capsys.readouterr().out
    claimed = [w.rstrip(".") for w in out.split() if w.endswith(".pt.") or w.endswith(".pt")]
    assert all(Path(c).exists() for c in claimed), f"message names missing files: {claimed}"
