"""nanoresume.train(): one call, the command line's settings checked by the same code, a RunResult back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nanoresume
from nanoresume.errors import ConfigError
from tests.helpers import REPO, TINY_FLAGS


def test_a_setting_of_the_wrong_type_is_one_error_naming_it_and_nothing_is_created(tmp_path):
    with pytest.raises(ConfigError, match=r"^max_steps must be a whole number, not '10'$"):
        nanoresume.train(out_dir=str(tmp_path / "out"), max_steps="10")
    with pytest.raises(ValueError, match="preset 'big' must be one of cpu, gpu10m"):  # a ConfigError is one
        nanoresume.train(out_dir=str(tmp_path / "out"), preset="big")
    assert not (tmp_path / "out").exists()


def test_an_unknown_setting_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown setting 'max_stepz' \(did you mean 'max_steps'\?\)"):
        nanoresume.train(max_stepz=10)


def test_a_value_the_validation_refuses_is_named_as_a_setting_not_a_flag(tmp_path, tiny_text):
    with pytest.raises(ConfigError) as raised:
        nanoresume.train(out_dir=str(tmp_path / "out"), resume="none", data=str(tiny_text), n_embd=30, n_head=4,
                         lr=5.0)
    assert str(raised.value) == "lr 5.0 must be in (0, 1]; n_embd 30 must be divisible by n_head 4"
    with pytest.raises(ConfigError, match=r"^lr 5.0 must be in \(0, 1\]$"):  # resume="auto": checked at start-up
        nanoresume.train(out_dir=str(tmp_path / "auto"), data=str(tiny_text), lr=5.0)


def test_nanoresume_train_is_public_and_importing_it_does_not_import_torch():
    code = "import sys, nanoresume; nanoresume.train; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
    assert "train" in nanoresume.__all__


@pytest.mark.slow
def test_train_returns_what_happened_and_a_second_call_continues_the_run(tmp_path, tiny_text, capsys):
    settings = dict(TINY_FLAGS, data=str(tiny_text), cache_dir=str(tmp_path / "cache"), eval_interval=2,
                    progress=False)
    out = tmp_path / "out"
    first = nanoresume.train(out_dir=str(out), max_steps=2, **settings)
    assert (first.step, first.steps_trained, first.stop_reason, first.exit_code) == (2, 2, None, 0)
    assert first.finished and first.best_val_loss is not None
    assert first.last_checkpoint == out / "checkpoints" / "step_00000002.pt"
    assert first.best_checkpoint == out / "best.pt" and first.best_checkpoint.exists()

    more = nanoresume.train(out_dir=str(out), max_steps=4, **settings)  # resume="auto": continues at step 2
    assert (more.step, more.steps_trained) == (4, 2)
    assert more.best_val_loss <= first.best_val_loss
    assert "resumed from" in capsys.readouterr().out
    assert Path(more.last_checkpoint).name == "step_00000004.pt"
