"""nanoresume's checkpoints for a training loop of your own: atomic, self-verifying, kept in the background.

A thin layer over :class:`~nanoresume.checkpoint.CheckpointManager` (the policy, the background
writer, retention) and :func:`~nanoresume.checkpoint.resolve_resume` (which checkpoint to resume),
which the GPT trainer uses too; what it adds is the state itself, built from objects you name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Union

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .checkpoint import (FORMAT_VERSION, FORMAT_VERSION_KEY, KIND_KEY, CheckpointManager, CheckpointObserver,
                         remove_leftovers, resolve_resume)
from .errors import CheckpointError
from .schema import MAX_COUNT
from .signals import StopFlag
from .state import capture_rng_state, restore_rng_state

KIND = "state"  # what a Checkpointer file says it holds (the GPT trainer's are "train" and "weights")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


class Checkpointer:
    """Atomic, verified step checkpoints of named objects in ``folder``, and an exact resume from the newest.

    ::

        stop = StopFlag()
        checkpoints = Checkpointer("out/checkpoints", {"model": model, "optimizer": optimizer,
                                   "scheduler": scheduler}, every=100, stop=stop)
        step = checkpoints.resume("auto")        # 0: a new run; else every object is restored
        with stop.installed(), checkpoints:      # signals set the flag; closing waits for the last save
            while step < max_steps and not stop.is_set():
                ...                              # one optimizer step
                step += 1
                checkpoints.save(step, force=stop.is_set() or step == max_steps)
        sys.exit(stop.exit_code if step < max_steps else 0)

    ``objects`` maps names to anything with ``state_dict()`` / ``load_state_dict()``: modules,
    optimizers, schedulers, a ``GradScaler``, a :class:`~nanoresume.ResumableSampler`. With ``rng``
    (the default) the random streams of Python, NumPy, torch and every CUDA device are saved and
    restored as well, so dropout and random augmentation continue exactly. Each file is written to
    a temp file, fsynced and renamed into place, and carries its own SHA-256; it loads only after
    the checksum passes, and with ``weights_only=True``. ``background`` writes on a thread: the
    training loop waits only for a copy of the state in memory. The newest ``keep_last`` files are
    kept. ``stop`` (a :class:`~nanoresume.StopFlag`) learns of every commit, so that a forced stop
    (the KeyboardInterrupt of a third Ctrl-C) can name the last one. ``observer`` (a
    :class:`~nanoresume.checkpoint.CheckpointObserver`) watches every write.

    One process only: under torchrun (``WORLD_SIZE`` above 1) it refuses to start with a
    :class:`~nanoresume.CheckpointError`, since every rank would write the same folder.
    """

    def __init__(self, folder: Union[str, Path], objects: Mapping[str, Stateful], every: int = 100,
                 keep_last: int = 3, background: bool = True, every_seconds: Optional[float] = None,
                 rng: bool = True, stop: Optional[StopFlag] = None, warn: Callable[[str], None] = _warn,
                 observer: Optional[CheckpointObserver] = None) -> None:
        if every < 1 or keep_last < 1:
            raise ValueError(f"every ({every}) and keep_last ({keep_last}) must be at least 1")
        _refuse_several_processes(folder)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(self.folder):
            warn(f"removed {leftover}, left by an interrupted write")
        self.objects = dict(objects)
        self.rng = rng
        self.stop = stop
        self.warn = warn
        self.manager = CheckpointManager(self.folder, every, keep_last, background=background,
                                         every_seconds=every_seconds, on_commit=self._committed, observer=observer)

    def resume(self, mode: str = "auto") -> int:
        """Load every object (and the random streams) from a checkpoint; returns its step, 0 for a fresh start.

        ``mode``: ``"auto"`` the newest checkpoint that verifies (newer
        ones that do not are skipped, each with a warning; a fresh start if there is none);
        ``"none"`` a fresh start, refused if the folder already holds checkpoints; anything else the
        path of one checkpoint. Raises :class:`~nanoresume.CheckpointError` with a one-line reason.
        """
        found = resolve_resume(mode, self.manager.dir, self.warn, accept=self._check)
        if found is None:
            return 0
        path, state = found
        for name, obj in self.objects.items():  # every object fits before any is changed
            problem = _misfit(obj, state["objects"][name])
            if problem is not None:
                raise CheckpointError(f"{path}: {name} {problem}", f"build {name} as it was when this checkpoint "
                                      f"was saved, or start a new run in another folder")
        for name, obj in self.objects.items():
            _load(path, name, obj, state["objects"][name])
        if self.rng:
            for warning in restore_rng_state(state["rng"]):
                self.warn(warning)
        step = state["step"]
        self.manager.adopt(path, step, self.warn)
        if self.stop is not None:
            self.stop.last_committed_step = step
        return step

    def save(self, step: int, force: bool = False) -> bool:
        """Save every object as the checkpoint of ``step`` if one is due: every ``every`` steps, when
        ``every_seconds`` have passed, or when ``force`` (the last step, a stop). Returns whether it saved.

        In the background the state is copied first, so training may change it at once. Raises
        :class:`~nanoresume.CheckpointWriteError` (disk full, ...) for this save, or for a background
        one that failed since; earlier checkpoints stay intact.
        """
        self.manager.poll()
        if not self.manager.is_due(step, force):
            return False
        self.manager.save(step, self.build_state(step))
        return True

    def build_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` holds (references to live tensors: save or copy it at once)."""
        state = {FORMAT_VERSION_KEY: FORMAT_VERSION, KIND_KEY: KIND, "step": step,
                 "objects": {name: obj.state_dict() for name, obj in self.objects.items()}}
        if self.rng:
            state["rng"] = capture_rng_state()
        return state

    @property
    def committed_step(self) -> Optional[int]:
        """The newest step whose checkpoint is safely on disk (or that the run resumed from)."""
        return self.manager.committed_step

    def wait(self) -> None:
        """Return once no save is in flight and old checkpoints are pruned; raise the error of the
        last save if it failed."""
        self.manager.wait()

    def close(self) -> None:
        """Wait for the save in flight (raising its error, if any); call it before the process exits."""
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _committed(self, step: int, path: Path) -> None:
        if self.stop is not None:
            self.stop.last_committed_step = step

    def _check(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` if it is a Checkpointer file holding every object this run has, else CheckpointError."""
        check_state_file(path, state)
        missing = sorted(self.objects.keys() - state["objects"].keys())
        if missing:
            raise CheckpointError(f"{path}: holds no state for {', '.join(missing)} (it has "
                                  f"{', '.join(sorted(state['objects'])) or 'nothing'})")
        if self.rng and "rng" not in state:
            raise CheckpointError(f"{path}: holds no random number streams; resume it with rng=False")
        return state


def _misfit(obj: Stateful, saved: Any) -> Optional[str]:
    """Why ``saved`` cannot be loaded into the module ``obj`` (tensor names it lacks or does not
    expect, a tensor of another shape), in a few words; None if it fits or ``obj`` is no module
    (other objects may hold tensors whose shapes change as they run)."""
    if not isinstance(obj, nn.Module) or not isinstance(saved, Mapping):
        return None
    current = obj.state_dict()
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if missing:
        return f"has tensor(s) {', '.join(missing[:3])} that the checkpoint does not hold"
    if unexpected:
        return f"has no tensor(s) {', '.join(unexpected[:3])}, which the checkpoint holds"
    return _shape_misfit(current, saved, "")


def _shape_misfit(current: Any, saved: Any, where: str) -> Optional[str]:
    """The first tensor under ``current`` whose counterpart in ``saved`` has another shape."""
    if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor):
        if current.shape != saved.shape:
            return f"tensor {where or '(the state)'} has shape {tuple(saved.shape)} in the checkpoint but " \
                   f"{tuple(current.shape)} here"
        return None
    if isinstance(current, Mapping) and isinstance(saved, Mapping):
        pairs: Any = ((key, current[key], saved[key]) for key in current if key in saved)
    elif isinstance(current, (list, tuple)) and isinstance(saved, (list, tuple)):
        pairs = zip(range(len(current)), current, saved)
    else:
        return None
    for key, mine, theirs in pairs:
        problem = _shape_misfit(mine, theirs, f"{where}.{key}" if where else str(key))
        if problem is not None:
            return problem
    return None


def _load(path: Path, name: str, obj: Stateful, saved: Any) -> None:
    """``obj.load_state_dict(saved)``, its errors as one CheckpointError line."""
    try:
        obj.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}: {name} cannot load its state from the checkpoint ({type(e).__name__}: "
                              f"{reason[:200]})", f"build {name} as it was when this checkpoint was saved, or "
                              f"start a new run in another folder") from None


def _refuse_several_processes(folder: Union[str, Path]) -> None:
    """A Checkpointer saves the state of one process: under torchrun every rank would write the same
    files, and all but one rank's random streams would be lost."""
    env = distributed.detect()
    world = env.world_size
    if world == 1 and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world > 1:
        raise CheckpointError(f"Checkpointer saves the state of one process, but this is rank {env.rank} of "
                              f"WORLD_SIZE={world}: every rank would write the same checkpoints in {folder}; "
                              f"use it in a single process")


def is_state_file(state: Any) -> bool:
    """Whether a loaded checkpoint says it was written by a :class:`Checkpointer`."""
    return isinstance(state, dict) and state.get(KIND_KEY) == KIND


def check_state_file(path: Path, state: Any) -> dict[str, Any]:
    """``state`` if it has a Checkpointer file's shape (step, named objects, optional RNG streams),
    else a one-line CheckpointError. What each object holds is its owner's business."""
    if not is_state_file(state):
        kind = state.get(KIND_KEY) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a checkpoint written by nanoresume.Checkpointer (kind {kind!r})")
    step, objects = state.get("step"), state.get("objects")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_COUNT:
        raise CheckpointError(f"{path}: its 'step' is {step!r:.40}, not a step number in [0, 2**62 - 1]; the file is "
                              f"damaged")
    if not isinstance(objects, dict) or not all(isinstance(name, str) for name in objects):
        raise CheckpointError(f"{path}: its 'objects' is not a dict of named states; the file is damaged")
    if "rng" in state and not isinstance(state["rng"], dict):
        raise CheckpointError(f"{path}: its 'rng' is not a dict of random streams; the file is damaged")
    return state
