"""Every line of a training run's story, as pure functions of plain values.

The trainer decides what happened; these say it. Each returns one line (no newline) for
:class:`~nanoresume.console.Console` or an error message, so they can be tested without a run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from .console import format_elapsed
from .invocation import shell_command


# ---- start-up ---------------------------------------------------------------------------------

def config_change(change: str, resumed: bool) -> str:
    """A setting that differs from the checkpoint's (``resumed``) or from an unsaved run's config.json."""
    return f"changed on resume: {change}" if resumed else f"changed since the last start: {change}"


def resumed(path: "Path | str", step: int) -> str:
    return f"resumed from {path} at step {step:,}"


def training_unsaved_run_again(checkpoints: Path, config: Path) -> str:
    return f"no checkpoint in {checkpoints} yet: training the run that {config} describes again, from step 0"


def new_run(checkpoints: Path) -> str:
    return f"no checkpoint in {checkpoints}; starting a new run"


def new_scaler() -> str:
    return "the checkpoint was not trained in float16: starting a new gradient scaler"


def new_rank_streams(saved_world_size: int, world_size: int) -> str:
    return (f"the checkpoint was written by {saved_world_size} process(es), this run has {world_size}: model, "
            f"optimizer and data order continue exactly, but each rank's random numbers (dropout) start new "
            f"streams")


def other_data(path: Path, saved_fingerprint: str, fingerprint: str, source: str) -> str:
    return (f"cannot resume from {path}: the training data differs (fingerprint {saved_fingerprint[:12]} in the "
            f"checkpoint, {fingerprint[:12]} for {source}); pass the same --data, or choose another --out-dir "
            f"for a new run")


def not_main_thread() -> str:
    return "not in the main thread: signals will not stop training gracefully"


def start(first_step: int, max_steps: int, device_type: str, dtype_name: str, parameters: int,
          tokens_per_step: int, world_size: int, batch_size: int, grad_accum: int, global_batch: int,
          sharded: bool, data: str) -> str:
    """The first line of every start: what trains, where, how big, on which data."""
    processes = (f", {world_size} processes x batch {batch_size} x accumulation {grad_accum} = "
                 f"global batch {global_batch:,}" if world_size > 1 else "")
    if sharded:
        processes += f", sharded over {world_size} process{'es' if world_size > 1 else ''} (FSDP2)"
    return (f"training steps {first_step:,} -> {max_steps:,} on {device_type} ({dtype_name}), "
            f"{parameters / 1e6:.2f}M parameters, {tokens_per_step:,} tokens/step{processes}; data {data}")


def nothing_to_do(step: int, max_steps: int) -> str:
    return (f"already at step {step:,} of --max-steps {max_steps:,}; nothing to do (raise --max-steps to "
            f"train longer)")


def lost_steps(first_trained: int, last_lost: Optional[int]) -> Optional[str]:
    """Steps an earlier start logged but never saved (None when there are none): they train again."""
    if last_lost is None or last_lost < first_trained:
        return None
    steps = f"step {first_trained:,}" if last_lost == first_trained else f"steps {first_trained:,}-{last_lost:,}"
    return f"{steps} trained before the last stop were never saved: lost, training again"


# ---- during training --------------------------------------------------------------------------

def evaluation(step: int, train_loss: Optional[float], val_loss: float, perplexity: float,
               tokens_per_second: Optional[float]) -> str:
    """One evaluation, with the mean train loss and throughput since the last one ("-" before any step)."""
    train = f"{train_loss:.4f}" if train_loss is not None else "-"
    rate = f"{tokens_per_second:,.0f} tok/s" if tokens_per_second is not None else "-"
    return f"step {step:>6} | train loss {train} | val loss {val_loss:.4f} | val ppl {perplexity:.2f} | {rate}"


def mirror_lag(steps: int, seconds: float) -> str:
    """What the evaluation line adds with --mirror: how far the mirror is behind the newest local commit."""
    return " | mirror up to date" if steps == 0 else f" | mirror -{steps:,} steps, {seconds:.0f} s"


def newest_saved(step: Optional[int]) -> str:
    return "no checkpoint yet" if step is None else f"newest checkpoint: step {step}"


def nonfinite_loss(loss: float, step: int, newest_checkpoint: Optional[int]) -> str:
    return (f"training loss is {loss} at step {step}; nothing from that step was saved "
            f"({newest_saved(newest_checkpoint)}). Lower --lr, raise --warmup-steps or use --dtype "
            f"bfloat16/float32, then rerun with --resume auto")


def nonfinite_weights(parameter: str, step: int) -> str:
    return (f"parameter {parameter} holds NaN/inf at step {step}; not saving it. Lower --lr, then rerun with "
            f"--resume auto")


# ---- the end ----------------------------------------------------------------------------------

def stopped(reason: Optional[str], step: int, saved: Optional[Path], command: Sequence[str], out_dir: str) -> str:
    """A stop before the end, and the command that continues the run."""
    where = f"saved {saved}" if saved is not None else "nothing new to save"
    again = shell_command([*command, "--out-dir", out_dir, "--resume", "auto"])
    return f"stopped by {reason} after step {step:,}; {where}. Continue with: {again}"


def stopped_under_torchrun(reason: Optional[str], step: int, saved: Optional[Path],
                           launcher: Optional[Sequence[str]]) -> str:
    """A stop of a torchrun job, and the launcher's command that continues it (``launcher``: torchrun's
    words with ``--resume auto``, or None when they cannot be read). The worker's own command would
    continue the run on one process."""
    where = f"saved {saved}" if saved is not None else "nothing new to save"
    again = (f"Continue with: {shell_command(launcher)}" if launcher is not None else
             "Continue by running the same torchrun command again with --resume auto")
    return f"stopped by {reason} after step {step:,}; {where}. {again}"


def restarted_by_torchrun(restart: int, max_restarts: Optional[int]) -> str:
    """The first line of a start that torchrun made after a worker failed (``--max-restarts``)."""
    of = f" of {max_restarts}" if max_restarts is not None else ""
    return f"torchrun restarted the workers (restart {restart}{of}): continuing from the last committed checkpoint"


def finished(step: int, tokens_seen: int, best_val_loss: float, best_path: Path, elapsed_seconds: float) -> str:
    best = (f"best val loss {best_val_loss:.4f} in {best_path}" if math.isfinite(best_val_loss)
            else "no validation loss yet")
    return (f"finished: {step:,} steps, {tokens_seen:,} tokens, {best}, "
            f"wall time {format_elapsed(elapsed_seconds)}")


# ---- the end, in Python (nanoresume.train in a notebook or a program) ------------------------

def how_to_continue(where: str, step: Optional[int]) -> str:
    """The sentence after a stop that says how to continue where the run was started: ``"notebook"``
    (run the cell again), ``"python"`` (call train again) or ``"shell"``; ``step``: the newest committed
    checkpoint, where a resume continues (None: there is none, a resume starts over)."""
    resumes = f"continues from step {step:,}" if step is not None else "starts over from step 0"
    if where == "notebook":
        return f". Run this cell again (resume='auto' {resumes})"
    if where == "python":
        return f". Call nanoresume.train() again with resume='auto': it {resumes}"
    return f". Run again with --resume auto: it {resumes}"


def waiting_for_commit(step: Optional[int], committed: Optional[int]) -> str:
    """Library use: the user interrupted again while the stop's save is being written."""
    return (f"interrupted again: waiting for the checkpoint of step {step:,} to be written (last committed: "
            f"{'none' if committed is None else f'step {committed:,}'}); interrupt once more to abandon it")


def stopped_in_python(reason: Optional[str], step: int, saved: Optional[Path], resume_step: Optional[int],
                      where: str) -> str:
    """A stop before the end of a run started from Python (``where``: "notebook" or "python")."""
    done = f"saved {saved}" if saved is not None else "nothing new to save"
    return f"stopped by {reason} after step {step:,}; {done}{how_to_continue(where, resume_step)}"
