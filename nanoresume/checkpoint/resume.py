"""Which checkpoint a run resumes from: ``"auto"`` (the newest that verifies), ``"none"`` (a fresh
start, never over existing checkpoints) or a path, and whether a state is one a run can continue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import REMEDY_NONE_USABLE, REMEDY_RESUME_OR_ELSEWHERE, CheckpointError
from .files import load_checkpoint, step_of
from .stepdir import CheckpointDir


def resolve_resume(
    mode: str,
    folder: CheckpointDir,
    warn: Callable[[str], None],
    *,
    accept: Callable[[Path, dict[str, Any]], dict[str, Any]],
    load: Callable[[Path], dict[str, Any]] = load_checkpoint,
    advice: Optional[Mapping[str, str]] = None,
) -> Optional[tuple[Path, dict[str, Any]]]:
    """Which checkpoint a run starts from, as ``(path, state)``, or None for a fresh start.

    ``accept(path, state)`` returns the state if a run can resume from it, else raises
    CheckpointError (the trainer passes :func:`nanoresume.training_state.require_train_state`).
    ``advice`` words the fixes of refusals in the caller's terms (see :mod:`nanoresume.errors`).

    - ``"auto"``: the newest step checkpoint that verifies; each newer one that does not is
      skipped with a warning, and none newer than the step a set-aside cut short by a kill was
      keeping is considered (:meth:`CheckpointDir.pending_set_aside`; the resume completes it).
      None if the folder holds no step checkpoints. If it holds some and none can be used, refuse
      (CheckpointError): a new run there would prune or overwrite files it could not read, and
      they may be all that is left of a run.
    - ``"none"``: None, but refuse if the folder already holds step checkpoints, so a
      finished run is never clobbered by accident.
    - anything else: a path that must load, or CheckpointError.
    """
    try:
        return _resolve(mode, folder, warn, load, accept)
    except CheckpointError as e:
        raise e.reworded(advice or {}) from None


def _resolve(mode: str, folder: CheckpointDir, warn: Callable[[str], None], load: Callable[[Path], dict[str, Any]],
             accept: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> Optional[tuple[Path, dict[str, Any]]]:
    obstacles = folder.obstacles()
    if obstacles:
        kind = "a folder" if obstacles[0].is_dir() else "a file" if obstacles[0].is_file() else "no file or folder"
        raise CheckpointError(f"{obstacles[0]} is {kind}, in the way of the checkpoint of step "
                              f"{step_of(obstacles[0])}; move it out of {folder.path}, then start again")
    if mode == "none":
        existing = folder.list()
        if existing:
            raise CheckpointError(f"{folder.path} already holds {len(existing)} checkpoint(s) (newest "
                                  f"{existing[-1].path.name})", "resume from them (mode 'auto') or use another folder",
                                  REMEDY_RESUME_OR_ELSEWHERE, folder=folder.path)
        return None
    if mode == "auto":
        candidates = folder.list()
        kept = folder.pending_set_aside()  # a set-aside cut short by a kill: the run left what is newer
        left = [c for c in candidates if kept is not None and c.step > kept]
        if left:
            warn(f"{', '.join(c.path.name for c in left[:3])}{', ...' if len(left) > 3 else ''}: newer than "
                 f"step {kept}, which a run resumed from before it was stopped; they are set aside, not resumed")
        for candidate in reversed([c for c in candidates if c not in left]):
            try:
                return candidate.path, accept(candidate.path, load(candidate.path))
            except CheckpointError as e:
                warn(f"skipping {e}")
        if candidates:
            names = ", ".join(c.path.name for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            raise CheckpointError(f"none of the {len(candidates)} checkpoint(s) in {folder.path} ({names}) can be "
                                  f"used, and a new run there would delete them",
                                  "move them away to start over, or use another folder", REMEDY_NONE_USABLE,
                                  folder=folder.path)
        return None
    path = Path(mode).expanduser()
    return path, accept(path, load(path))
