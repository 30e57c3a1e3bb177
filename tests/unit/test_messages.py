"""Every line of a run's story, exactly as a user reads it."""

from __future__ import annotations

import math
from pathlib import Path

from nanoresume import messages


def test_a_config_change_says_whether_it_is_against_a_checkpoint_or_an_unsaved_start():
    assert messages.config_change("--lr: 0.002 -> 0.001", resumed=True) == "changed on resume: --lr: 0.002 -> 0.001"
    assert messages.config_change("--lr: 0.002 -> 0.001", resumed=False) == \
        "changed since the last start: --lr: 0.002 -> 0.001"


def test_how_a_start_begins_names_the_checkpoint_or_the_folder():
    checkpoints = Path("out/checkpoints")
    assert messages.resumed(checkpoints / "step_00001000.pt", 1000) == \
        "resumed from out/checkpoints/step_00001000.pt at step 1,000"
    assert messages.new_run(checkpoints) == "no checkpoint in out/checkpoints; starting a new run"
    assert messages.training_unsaved_run_again(checkpoints, Path("out/config.json")) == \
        "no checkpoint in out/checkpoints yet: training the run that out/config.json describes again, from step 0"


def test_the_start_line_of_a_single_process():
    line = messages.start(0, 5000, "cpu", "float32", 1_234_567, 1536, 1, 12, 1, 12, False, "corpus.txt (1 file)")
    assert line == ("training steps 0 -> 5,000 on cpu (float32), 1.23M parameters, 1,536 tokens/step; "
                    "data corpus.txt (1 file)")


def test_the_start_line_of_a_sharded_job_names_the_global_batch_and_fsdp():
    line = messages.start(10, 20, "cuda", "bfloat16", 10_000_000, 4096, 2, 4, 2, 16, True, "d")
    assert line == ("training steps 10 -> 20 on cuda (bfloat16), 10.00M parameters, 4,096 tokens/step, "
                    "2 processes x batch 4 x accumulation 2 = global batch 16, sharded over 2 processes (FSDP2); "
                    "data d")


def test_one_process_under_fsdp_is_one_process():
    assert messages.start(0, 1, "cpu", "float32", 0, 1, 1, 1, 1, 1, True, "d").endswith(
        "1 tokens/step, sharded over 1 process (FSDP2); data d")


def test_nothing_to_do_says_how_to_train_longer():
    assert messages.nothing_to_do(5000, 5000) == \
        "already at step 5,000 of --max-steps 5,000; nothing to do (raise --max-steps to train longer)"


def test_steps_logged_but_never_saved_are_named_once_lost():
    assert messages.lost_steps(11, None) is None
    assert messages.lost_steps(11, 10) is None
    assert messages.lost_steps(11, 11) == "step 11 trained before the last stop were never saved: lost, training again"
    assert messages.lost_steps(11, 1500) == \
        "steps 11-1,500 trained before the last stop were never saved: lost, training again"


def test_an_evaluation_line_shows_dashes_before_any_training_step():
    assert messages.evaluation(0, None, 5.54321, 255.5, None) == \
        "step      0 | train loss - | val loss 5.5432 | val ppl 255.50 | -"
    assert messages.evaluation(500, 2.0, 2.1, 8.17, 12345.6) == \
        "step    500 | train loss 2.0000 | val loss 2.1000 | val ppl 8.17 | 12,346 tok/s"


def test_a_non_finite_loss_names_the_newest_checkpoint_and_the_fixes():
    assert messages.nonfinite_loss(float("nan"), 7, None) == (
        "training loss is nan at step 7; nothing from that step was saved (no checkpoint yet). Lower --lr, raise "
        "--warmup-steps or use --dtype bfloat16/float32, then rerun with --resume auto")
    assert "(newest checkpoint: step 5)" in messages.nonfinite_loss(math.inf, 7, 5)


def test_non_finite_weights_name_the_parameter():
    assert messages.nonfinite_weights("blocks.0.fc.weight", 9) == (
        "parameter blocks.0.fc.weight holds NaN/inf at step 9; not saving it. Lower --lr, then rerun with "
        "--resume auto")


def test_a_stop_says_what_was_saved_and_how_to_continue_quoting_paths():
    assert messages.stopped("SIGTERM", 1234, Path("my out/checkpoints/step_00001234.pt"), ["nanoresume", "train"],
                            "my out") == (
        "stopped by SIGTERM after step 1,234; saved my out/checkpoints/step_00001234.pt. "
        "Continue with: nanoresume train --out-dir 'my out' --resume auto")
    assert "; nothing new to save. Continue with: " in messages.stopped("time limit", 0, None, ["x"], "out")


def test_the_finished_line_names_the_best_weights_when_there_are_any():
    assert messages.finished(5000, 7_680_000, 1.23456, Path("out/best.pt"), 75.0) == \
        "finished: 5,000 steps, 7,680,000 tokens, best val loss 1.2346 in out/best.pt, wall time 0:01:15"
    assert "no validation loss yet" in messages.finished(0, 0, math.inf, Path("out/best.pt"), 0.0)


def test_resume_warnings():
    assert messages.new_scaler() == "the checkpoint was not trained in float16: starting a new gradient scaler"
    assert messages.new_rank_streams(2, 4) == (
        "the checkpoint was written by 2 process(es), this run has 4: model, optimizer and data order continue "
        "exactly, but each rank's random numbers (dropout) start new streams")
    assert messages.other_data(Path("c.pt"), "a" * 64, "b" * 64, "x.txt") == (
        "cannot resume from c.pt: the training data differs (fingerprint aaaaaaaaaaaa in the checkpoint, "
        "bbbbbbbbbbbb for x.txt); pass the same --data, or choose another --out-dir for a new run")


def test_a_stop_in_a_notebook_says_to_run_the_cell_again_and_from_which_step():
    assert messages.stopped_in_python("SIGINT", 120, Path("out/checkpoints/step_00000120.pt"), 120, "notebook") == (
        "stopped by SIGINT after step 120; saved out/checkpoints/step_00000120.pt. "
        "Run this cell again (resume='auto' continues from step 120)")
    assert messages.stopped_in_python("SIGINT", 3, None, None, "python") == (
        "stopped by SIGINT after step 3; nothing new to save. Call nanoresume.train() again with "
        "resume='auto': it starts over from step 0")


def test_how_to_continue_fits_where_the_run_was_started():
    assert messages.how_to_continue("notebook", 1000) == \
        ". Run this cell again (resume='auto' continues from step 1,000)"
    assert messages.how_to_continue("python", 5) == \
        ". Call nanoresume.train() again with resume='auto': it continues from step 5"
    assert messages.how_to_continue("shell", None) == ". Run again with --resume auto: it starts over from step 0"


def test_insisting_while_the_stop_is_saved_says_what_is_awaited_and_how_to_abandon_it():
    assert messages.waiting_for_commit(1200, 1000) == (
        "interrupted again: waiting for the checkpoint of step 1,200 to be written (last committed: step 1,000); "
        "interrupt once more to abandon it")
    assert "(last committed: none)" in messages.waiting_for_commit(5, None)


def test_a_stop_under_torchrun_continues_with_the_launcher_s_command_or_says_to_rerun_it():
    saved = Path("out/checkpoints/step_00000040.pt")
    command = ["torchrun", "--nproc-per-node", "2", "train.py", "--out-dir", "my out", "--resume", "auto"]
    assert messages.stopped_under_torchrun("SIGTERM", 40, saved, command) == (
        "stopped by SIGTERM after step 40; saved out/checkpoints/step_00000040.pt. Continue with: "
        "torchrun --nproc-per-node 2 train.py --out-dir 'my out' --resume auto")
    assert messages.stopped_under_torchrun("SIGTERM", 1200, None, None) == (
        "stopped by SIGTERM after step 1,200; nothing new to save. Continue by running the same torchrun "
        "command again with --resume auto")


def test_a_start_made_by_torchrun_after_a_failure_says_it_is_a_restart():
    assert messages.restarted_by_torchrun(1, 3) == \
        "torchrun restarted the workers (restart 1 of 3): continuing from the last committed checkpoint"
    assert messages.restarted_by_torchrun(2, None) == \
        "torchrun restarted the workers (restart 2): continuing from the last committed checkpoint"
