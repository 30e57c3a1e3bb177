"""The heart of nanoresume: a run stopped at any step and resumed is the run that never stopped.

Every comparison is exact: tensors bit for bit (nanoresume.compare), losses as Python floats with ==.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import nanoresume.evaluating as evaluating
import nanoresume.trainer as trainer_module
import nanoresume.training_parts as training_parts
from nanoresume.checkpoint import load_checkpoint, step_path
from nanoresume.data import BatchSampler
from nanoresume.trainer import Trainer
from tests.helpers import final_state, train, train_in_pieces

N = 20  # steps of every run here; eval every 5


@pytest.fixture
def configs(make_config, reference_run):
    """``configs(**overrides)`` -> (the uninterrupted reference run, a config to interrupt): the same run,
    the reference trained once per session for these overrides."""
    def make(**overrides):
        return reference_run(max_steps=N, eval_interval=5, **overrides), \
            make_config(max_steps=N, eval_interval=5, **overrides)
    return make


def assert_identical(baseline, resumed, resumed_losses, assert_same_state):
    assert [s for s, _ in resumed_losses] == list(range(1, N + 1)), "each step trained exactly once"
    assert resumed_losses == baseline.step_losses
    assert_same_state(baseline.model, resumed.raw_model.state_dict(), "model")
    assert_same_state(baseline.optimizer, resumed.optimizer.state_dict(), "optimizer")
    assert_same_state(baseline.state, final_state(resumed))


@pytest.mark.parametrize("stop_at", [
    pytest.param(1, id="after-the-first-step"),
    pytest.param(3, id="between-checkpoints"),
    pytest.param(6, id="right-after-an-eval"),
    pytest.param(13, id="late"),
])
def test_stopping_at_step_k_and_resuming_equals_the_uninterrupted_run(configs, stop_at, assert_same_state):
    baseline, cut_cfg = configs()
    assert cut_cfg.dropout > 0  # dropout makes the torch RNG part of the state under test
    resumed, losses = train_in_pieces(cut_cfg, [stop_at])
    assert_identical(baseline, resumed, losses, assert_same_state)


def test_a_gradient_accumulation_run_stopped_between_checkpoints_resumes_exactly(configs, assert_same_state):
    baseline, cut_cfg = configs(grad_accum=2, ckpt_interval=8)
    _, first = train(cut_cfg, stop_at=11)  # checkpoints fall due at 8 and 16; the stop forces one at 11
    assert sorted(p.name for p in (Path(cut_cfg.out_dir) / "checkpoints").glob("*.pt")) == [
        "step_00000008.pt", "step_00000011.pt"]
    resumed, second = train(dataclasses.replace(cut_cfg, resume="auto"))
    assert_identical(baseline, resumed, first.step_losses + second.step_losses, assert_same_state)
    assert resumed.sampler.index == N  # one global batch (two micro-batches) per step, none drawn twice


def test_three_chained_interruptions_give_the_same_result_as_one_run(configs, assert_same_state):
    baseline, cut_cfg = configs()
    resumed, losses = train_in_pieces(cut_cfg, [2, 7, 15])
    assert_identical(baseline, resumed, losses, assert_same_state)


def test_resuming_from_an_older_checkpoint_replays_the_lost_steps_exactly(configs, assert_same_state):
    """A crash after step 13 loses steps 11-13; resuming from step 10 must redo them identically."""
    baseline, cut_cfg = configs()
    _, first = train(cut_cfg, stop_at=13)
    newest = step_path(Path(cut_cfg.out_dir) / "checkpoints", 13)
    newest.unlink()
    resumed, second = train(dataclasses.replace(cut_cfg, resume="auto"))
    assert resumed.resumed_from == step_path(Path(cut_cfg.out_dir) / "checkpoints", 10)
    assert first.step_losses[10:13] == second.step_losses[:3]
    assert first.step_losses[:10] + second.step_losses == baseline.step_losses
    assert_same_state(baseline.state, final_state(resumed))


@pytest.mark.parametrize("stop_at", [
    pytest.param(3, id="between-evals"),
    pytest.param(6, id="right-after-an-eval"),
    pytest.param(5, id="at-an-eval-step"),
    pytest.param(N, id="at-the-last-step"),
])
def test_the_checkpoint_written_at_a_stop_equals_the_one_an_uninterrupted_run_writes_there(
        make_config, reference_run, stop_at, assert_same_state):
    every_step = reference_run(max_steps=N, eval_interval=5, ckpt_interval=1, keep_last=N)
    cut_cfg = make_config(max_steps=N, eval_interval=5)
    train(cut_cfg, stop_at=stop_at)
    expected = load_checkpoint(step_path(every_step.out / "checkpoints", stop_at))
    written = load_checkpoint(step_path(Path(cut_cfg.out_dir) / "checkpoints", stop_at))
    for state in (expected, written):
        del state["config"]
    assert_same_state(expected, written)


# ---- the comparison can fail: a broken restore must be caught ---------------------------------


def test_a_resume_that_skips_restoring_the_rngs_is_detected(configs, monkeypatch, assert_same_state):
    baseline, cut_cfg = configs()
    monkeypatch.setattr(training_parts, "restore_rng_state", lambda state: [])
    resumed, losses = train_in_pieces(cut_cfg, [6])
    assert losses[:6] == baseline.step_losses[:6]
    assert losses[6] != baseline.step_losses[6]  # dropout masks differ from the first resumed step
    with pytest.raises(AssertionError, match="differ"):
        assert_same_state(baseline.model, resumed.raw_model.state_dict(), "model")


def test_a_resume_that_skips_restoring_the_sampler_is_detected(configs, monkeypatch, assert_same_state):
    baseline, cut_cfg = configs()
    monkeypatch.setattr(BatchSampler, "load_state_dict", lambda self, state: None)
    resumed, losses = train_in_pieces(cut_cfg, [6])
    assert losses[6] != baseline.step_losses[6]
    with pytest.raises(AssertionError):
        assert_identical(baseline, resumed, losses, assert_same_state)


def test_a_resume_that_skips_the_optimizer_state_is_detected(configs, monkeypatch, assert_same_state):
    baseline, cut_cfg = configs()
    monkeypatch.setattr(trainer_module.torch.optim.AdamW, "load_state_dict", lambda self, state: None)
    resumed, losses = train_in_pieces(cut_cfg, [6])
    with pytest.raises(AssertionError):
        assert_same_state(baseline.optimizer, resumed.optimizer.state_dict(), "optimizer")
    assert losses != baseline.step_losses


def test_a_stop_during_the_final_evaluation_is_a_stop_and_the_restart_redoes_it(configs, monkeypatch,
                                                                                  assert_same_state):
    baseline, cut_cfg = configs()

    trainer = Trainer(cut_cfg)
    real_windows = evaluating.windows

    def windows_that_signal_in_the_final_eval(tokens, offsets, block_size):
        if tokens is trainer.data.val and trainer.counters.step == N:
            trainer.stop.request("test", 99)
        return real_windows(tokens, offsets, block_size)

    monkeypatch.setattr(evaluating, "windows", windows_that_signal_in_the_final_eval)
    result = trainer.run()
    assert (result.step, result.exit_code, result.stop_reason) == (N, 99, "test")
    monkeypatch.undo()

    resumed = Trainer(dataclasses.replace(cut_cfg, resume="auto"))
    assert resumed.run().exit_code == 0
    assert resumed.counters.evaluated_step == N
    assert_same_state(baseline.state, final_state(resumed))
