"""Test-only instrumentation of a training process, installed by this folder's ``sitecustomize``.

A test puts ``tests/harness`` on the ``PYTHONPATH`` of the processes it starts (torchrun's workers
inherit it) and sets these variables; the nanoresume package itself knows nothing of them:

- ``NANORESUME_PROBE_RECORD=DIR``: each rank appends JSON lines to ``DIR/rank<r>.jsonl``:
  ``{"step", "loss"}`` after every optimizer step and ``{"index", "offsets"}`` for the
  windows it drew, so tests can compare losses bit for bit and the data order window for window;
- ``NANORESUME_PROBE_STOP=STEP[:RANK]``: during that step, that rank (default: every rank)
  asks to stop exactly as a SIGTERM would;
- ``NANORESUME_PROBE_NAN=STEP:RANK``: that rank's loss is NaN at that step;
- ``NANORESUME_PROBE_SIGTERM=STEP[:RANK]``: during that step, that rank sends itself a real SIGTERM;
- ``NANORESUME_PROBE_KILL_IN_SAVE=STEP:RANK``: that rank SIGKILLs itself inside the write of the
  checkpoint folder of that step, once every rank's shards are written and before the manifest is;
- ``NANORESUME_PROBE_DUMP_RESUMED=FILE``: right after a resume, rank 0 saves the state
  every rank then holds, gathered whole in the file layout (``Trainer.state_dict()``), to FILE.
- ``NANORESUME_PROBE_DIE_IN=SITE:RANK[:NTH]``: that rank SIGKILLs itself as it enters the NTH call
  (default 1) of a collective of :mod:`nanoresume.distributed`: ``vote`` (the per-step all-gather),
  ``gather`` (the checkpoint gather), ``eval`` (evaluation's sum), ``broadcast`` (the resume
  broadcast at start-up) or ``barrier``; its peers then meet a dead process there;
- ``NANORESUME_PROBE_DUMP_INIT=FILE``: right after the model is built, before any resume, rank 0
  saves the initial weights, gathered whole (``parallel.full_weights``), to FILE.
- ``NANORESUME_PROBE_FORGET_RNG=1``: a resumed run leaves its random number streams as they are
  instead of restoring them: a deliberately broken resume, which must be caught.

Production runs never import this module: it is not part of the package.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

import torch

RECORD_ENV = "NANORESUME_PROBE_RECORD"
STOP_ENV = "NANORESUME_PROBE_STOP"
NAN_ENV = "NANORESUME_PROBE_NAN"
SIGTERM_ENV = "NANORESUME_PROBE_SIGTERM"
KILL_IN_SAVE_ENV = "NANORESUME_PROBE_KILL_IN_SAVE"
DUMP_RESUMED_ENV = "NANORESUME_PROBE_DUMP_RESUMED"
FORGET_RNG_ENV = "NANORESUME_PROBE_FORGET_RNG"
DIE_IN_ENV = "NANORESUME_PROBE_DIE_IN"
DIE_SITES = {"vote": "all_gather_rows", "gather": "gather_objects", "eval": "all_sum",
             "broadcast": "broadcast_object", "barrier": "barrier"}
DUMP_INIT_ENV = "NANORESUME_PROBE_DUMP_INIT"


def _step_and_rank(text: Optional[str]) -> Optional[tuple[int, Optional[int]]]:
    if not text:
        return None
    step, _, rank = text.partition(":")
    return int(step), (int(rank) if rank else None)


def install() -> None:
    """Patch the trainer and sampler as the environment asks; a no-op when it asks for nothing."""
    from nanoresume import distributed, training_parts
    from nanoresume.data import BatchSampler
    from nanoresume.model import GPT
    from nanoresume.trainer import Trainer

    rank = distributed.detect().rank
    record_dir = os.environ.get(RECORD_ENV)
    stop_at = _step_and_rank(os.environ.get(STOP_ENV))
    nan_at = _step_and_rank(os.environ.get(NAN_ENV))
    signal_at = _step_and_rank(os.environ.get(SIGTERM_ENV))
    poison = {"on": False}

    def record(entry: dict[str, Any]) -> None:
        if record_dir:
            with open(Path(record_dir) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    draw = BatchSampler.next_micro_batches

    def recorded_draw(self: BatchSampler, *args: Any, **kwargs: Any) -> Any:
        index = self.index
        batches = draw(self, *args, **kwargs)
        record({"index": index, "offsets": [int(o) for batch in batches for o in batch]})
        return batches

    step = Trainer.train_step

    def probed_step(self: Trainer) -> tuple[float, float]:
        upcoming = self.counters.step + 1
        if stop_at and stop_at[0] == upcoming and stop_at[1] in (None, rank):
            self.stop.request("SIGTERM", 143)
        if signal_at and signal_at[0] == upcoming and signal_at[1] in (None, rank):
            os.kill(os.getpid(), signal.SIGTERM)
        poison["on"] = bool(nan_at and nan_at == (upcoming, rank))
        try:
            loss, norm = step(self)
        finally:
            poison["on"] = False
        record({"step": upcoming, "loss": loss})
        return loss, norm

    forward = GPT.forward

    def poisoned_forward(self: GPT, *args: Any, **kwargs: Any) -> Any:
        logits, loss = forward(self, *args, **kwargs)
        if poison["on"] and loss is not None:
            loss = loss * torch.tensor(float("nan"), device=loss.device)
        return logits, loss

    _install_save_and_resume_probes(rank)
    _install_death_probe(rank)
    if os.environ.get(FORGET_RNG_ENV):
        training_parts.restore_rng_state = lambda state: []  # type: ignore[assignment]
    BatchSampler.next_micro_batches = recorded_draw  # type: ignore[method-assign]
    Trainer.train_step = probed_step  # type: ignore[method-assign]
    GPT.forward = poisoned_forward  # type: ignore[method-assign]
    _install_hold_probes(rank)


def _install_save_and_resume_probes(rank: int) -> None:
    from nanoresume.trainer import Trainer

    kill_at = _step_and_rank(os.environ.get(KILL_IN_SAVE_ENV))
    if kill_at is not None and kill_at[1] == rank:
        from nanoresume import checkpoint

        class KillInsideWrite(checkpoint.CheckpointObserver):
            def before_commit(self, target: Path) -> None:
                if target.name == f"step_{kill_at[0]:08d}":
                    os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.observe(KillInsideWrite())
    dump = os.environ.get(DUMP_RESUMED_ENV)
    if dump:
        resume_from = Trainer._resume_from

        def dumped_resume(self: Trainer, *args: Any, **kwargs: Any) -> None:
            resume_from(self, *args, **kwargs)
            state = self.state_dict()  # a collective: every rank takes part
            if self.env.is_main:
                torch.save(state, dump)

        Trainer._resume_from = dumped_resume  # type: ignore[method-assign]
    initial = os.environ.get(DUMP_INIT_ENV)
    if initial:
        from nanoresume import parallel

        build_model = Trainer._build_model

        def dumped_build(self: Trainer, *args: Any, **kwargs: Any) -> None:
            build_model(self, *args, **kwargs)
            weights = parallel.full_weights(self.raw_model, self.sharded_model)  # a collective under FSDP
            if self.env.is_main:
                torch.save(weights, initial)

        Trainer._build_model = dumped_build  # type: ignore[method-assign]


def _install_death_probe(rank: int) -> None:
    """``NANORESUME_PROBE_DIE_IN``: SIGKILL this rank as it enters the chosen collective."""
    from nanoresume import distributed

    text = _for_this_attempt(os.environ.get(DIE_IN_ENV))
    if not text:
        return
    site, dying_rank, *nth = text.split(":")
    if int(dying_rank) != rank:
        # A survivor still starting (no stop handler yet) would die silently of the SIGTERM torchrun sends
        # once it sees the death, if that came first; ignored here, it reaches the collective and says so.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    name = DIE_SITES[site]
    collective, calls, due = getattr(distributed, name), [0], int(nth[0]) if nth else 1

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == due and distributed.active():
            os.kill(os.getpid(), signal.SIGKILL)
        return collective(*args, **kwargs)

    setattr(distributed, name, dying)


def read_records(folder: Path, rank: int = 0) -> tuple[dict[int, float], dict[int, list[int]]]:
    """(step -> loss, step index -> offsets) recorded by one rank; a later line for the same step wins
    (a step replayed after a kill)."""
    losses: dict[int, float] = {}
    windows: dict[int, list[int]] = {}
    path = Path(folder) / f"rank{rank}.jsonl"
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            losses[entry["step"]] = entry["loss"]
        else:
            windows[entry["index"]] = entry["offsets"]
    return losses, windows


HOLD_ENV = "NANORESUME_PROBE_HOLD"
PAUSE_ENV = "NANORESUME_PROBE_PAUSE"
HOLD_SECONDS = 120.0


def _install_hold_probes(rank: int) -> None:
    """Two more probes, each a wait before a step (outside the other probes of the step):

    - ``NANORESUME_PROBE_HOLD=STEP[:RANK]``: before that step, that rank (default: every rank) waits
      until its stop flag is set (a signal, its launcher's death), at most ``HOLD_SECONDS``: a test
      signals once the step before is recorded, and the run stops after exactly STEP, at any speed.
      Under ``--max-restarts`` it holds torchrun's first start only (``A;B``: A there, B in the restart);
    - ``NANORESUME_PROBE_PAUSE=STEP[,STEP...]:RANK:SECONDS``: that rank sleeps SECONDS before each of
      those steps, so that a decision taken by rank 0's clock (``--ckpt-minutes``) is due there at any
      speed.
    """
    import time

    from nanoresume.trainer import Trainer

    hold_at = _step_and_rank(_for_this_attempt(os.environ.get(HOLD_ENV)))
    pause = os.environ.get(PAUSE_ENV)
    steps, pausing_rank, seconds = pause.split(":") if pause else ("", "-1", "0")
    paused = {int(s) for s in steps.split(",") if s} if int(pausing_rank) == rank else set()
    if not paused and not (hold_at and hold_at[1] in (None, rank)):
        return
    step = Trainer.train_step

    def held_step(self: Trainer) -> tuple[float, float]:
        upcoming = self.counters.step + 1
        if hold_at and hold_at[0] == upcoming and hold_at[1] in (None, rank):
            deadline = time.monotonic() + HOLD_SECONDS
            while not self.stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        if upcoming in paused:
            time.sleep(float(seconds))
        return step(self)

    Trainer.train_step = held_step  # type: ignore[method-assign]


def _for_this_attempt(text: Optional[str]) -> Optional[str]:
    """``NANORESUME_PROBE_DIE_IN=A;B;...``: A in torchrun's first start of the workers, B in its first restart
    (``--max-restarts``), and so on; nothing in a restart past the list. One launch then shows a death in
    each of several places."""
    if not text:
        return None
    choices = text.split(";")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return choices[attempt] if attempt < len(choices) else None
