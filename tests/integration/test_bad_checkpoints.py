"""Type-confused checkpoints with a matching checksum: one line from every tool, never a traceback,
and --resume auto falls back past them to the newest good checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nanoresume.tools import ckpt, cli, evaluation, sampling
from nanoresume.checkpoint import load_checkpoint, save_atomically, step_path
from nanoresume.config import TrainConfig
from nanoresume.trainer import Trainer
from tests.helpers import TYPE_CONFUSED, flip_a_byte

GOOD_STEP = 10


@pytest.fixture
def run_copy(reference_run, tmp_path: Path) -> TrainConfig:
    """A copy of a run trained once per session to step 10."""
    return reference_run(max_steps=GOOD_STEP, eval_interval=GOOD_STEP).copy_to(tmp_path / "out")


def crafted(good: Path, name: str, target: Path) -> Path:
    """The good checkpoint with one field type-confused, saved with a matching .sha256."""
    state = load_checkpoint(good)
    TYPE_CONFUSED[name][0](state)
    save_atomically(state, target)
    return target


def one_error_line(capsys: pytest.CaptureFixture, code: int, expected_code: int = 2) -> str:
    captured = capsys.readouterr()
    assert code == expected_code, captured.out + captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("name", TYPE_CONFUSED)
def test_every_tool_says_what_is_wrong_in_one_line(run_copy: TrainConfig, tmp_path: Path, tiny_text: Path,
                                                   capsys: pytest.CaptureFixture, name: str) -> None:
    out = Path(run_copy.out_dir)
    good = step_path(out / "checkpoints", GOOD_STEP)
    bad = crafted(good, name, tmp_path / "bad.pt")
    named = TYPE_CONFUSED[name][1]
    capsys.readouterr()

    assert ckpt.main(["verify", str(bad)]) == 1  # "verify" now means "resume would accept it"
    verified = capsys.readouterr().out
    assert f"BAD  {bad}: " in verified and named in verified and "0 of 1" in verified
    export = ["export", str(bad), "--to", str(tmp_path / "w.pt")]
    for argv in (["show", str(bad)], ["diff", str(good), str(bad)], export):
        assert named in one_error_line(capsys, ckpt.main(argv)), argv
    assert named in one_error_line(capsys, sampling.main(["--ckpt", str(bad), "--max-new-tokens", "2"]))
    assert named in one_error_line(capsys, evaluation.main(["--ckpt", str(bad), "--data", str(tiny_text),
                                                            "--no-progress"]))
    train_args = ["--out-dir", str(out), "--resume", str(bad), "--max-steps", "12", "--no-progress"]
    assert named in one_error_line(capsys, cli.main(train_args))


def test_resume_auto_falls_back_past_all_six_to_the_newest_good_checkpoint(run_copy: TrainConfig,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    folder = Path(run_copy.out_dir) / "checkpoints"
    good = step_path(folder, GOOD_STEP)
    for offset, name in enumerate(TYPE_CONFUSED, start=1):
        crafted(good, name, step_path(folder, GOOD_STEP + offset))
    trainer = Trainer(dataclasses.replace(run_copy, resume="auto", max_steps=GOOD_STEP + 10))
    assert trainer.resumed_from == good
    assert trainer.run().step == GOOD_STEP + 10
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and
               r.getMessage().startswith("skipping")]
    assert len(skipped) == len(TYPE_CONFUSED)
    for line, (_, named) in zip(reversed(skipped), TYPE_CONFUSED.values()):
        assert named in line, line


def test_resume_auto_refuses_in_one_line_and_touches_nothing_when_no_step_file_is_usable(
        run_copy: TrainConfig, capsys: pytest.CaptureFixture) -> None:
    out = Path(run_copy.out_dir)
    folder = out / "checkpoints"
    good = step_path(folder, GOOD_STEP)
    for offset, name in enumerate(list(TYPE_CONFUSED)[:2], start=1):
        crafted(good, name, step_path(folder, GOOD_STEP + offset))
    flip_a_byte(good)  # now none of the three can be resumed from
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.parent == folder}
    code = cli.main(["--out-dir", str(out), "--resume", "auto", "--max-steps", "30", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    *skipped, line = err.strip().splitlines()  # a warning per file skipped, then the one error line
    assert len(skipped) == 3 and all(s.startswith("warning: skipping") for s in skipped), err
    assert line.startswith("error: none of the 3 checkpoint(s)") and "would delete them" in line, line
    after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.parent == folder}
    assert after == before  # not pruned, not overwritten, not set aside
