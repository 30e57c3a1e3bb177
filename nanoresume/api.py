"""``nanoresume.train(...)``: one call that trains (or continues) a run, for notebooks and programs.

    import nanoresume
    result = nanoresume.train(out_dir="runs/a", max_steps=2000, n_layer=4)   # resume="auto" by default
    result.stop_reason, result.step, result.best_val_loss, result.best_checkpoint

The settings are the command line's flags, named with ``_`` (``--max-steps`` is ``max_steps``), checked
and validated by the same code (:mod:`nanoresume.config`); a bad one raises one
:class:`~nanoresume.errors.ConfigError` (a ``ValueError``) naming it. The stop button of a notebook
(SIGINT) stops training gracefully: the step is saved and the result returned. Pressing it again never
kills the kernel (see :mod:`nanoresume.signals`); run the cell again to continue. For more control
(callbacks, a stop flag of your own), build a :class:`~nanoresume.trainer.Trainer`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from .signals import StopFlag

if TYPE_CHECKING:
    from .trainer import RunResult


def train(out_dir: str = "out", resume: str = "auto", mirror: Optional[str] = None, **settings: Any) -> RunResult:
    """Train the run in ``out_dir`` until ``max_steps`` or a stop; returns a
    :class:`~nanoresume.trainer.RunResult` (step, stop reason, exit code, best validation loss, the last
    committed checkpoint and best.pt).

    ``resume``: ``"auto"`` continues from the newest checkpoint in ``out_dir`` (a new run if there is
    none), ``"none"`` refuses a folder that holds checkpoints, or a checkpoint's path. ``mirror``: a
    folder (a mounted Google Drive) or URL that keeps a copy of every checkpoint (``--mirror``).
    ``settings``: any other flag of ``nanoresume train --help``, e.g. ``max_steps=500, n_layer=2``.
    Raises ``ConfigError`` (a ``ValueError``) for a bad setting, ``KeyboardInterrupt`` when the user
    interrupts more than once (after the save in flight is committed; a third time at once).
    """
    __tracebackhide__ = True  # IPython shows the caller's line and the one-line error, not this frame
    from .config import as_setting_names, config_from_settings
    from .console import in_notebook
    from .errors import ConfigError

    given = {"out_dir": out_dir, "resume": resume, **({} if mirror is None else {"mirror": mirror}), **settings}
    cfg, explicit = config_from_settings(given)
    started = time.monotonic()  # --time-limit counts from the call
    from .trainer import Trainer  # torch from here on

    where = "notebook" if in_notebook() else "python"  # the stop message then says to run the cell again
    stop = StopFlag()  # never ends the process: insisting raises KeyboardInterrupt
    with stop.installed():  # an interrupt during start-up asks for a stop too (at step 0, saved)
        try:
            trainer = Trainer(cfg, stop=stop, explicit=explicit, started=started, continue_in=where)
        except ConfigError as e:  # found once merged with a checkpoint's config: worded as settings too
            raise ConfigError(as_setting_names(str(e))) from None
        except KeyboardInterrupt:
            if stop.forced:
                raise stop.interrupted(_hint(where, stop)) from None
            raise
        return trainer.run()


def _hint(where: str, stop: StopFlag) -> str:
    from .messages import how_to_continue

    return how_to_continue(where, stop.last_committed_step)
