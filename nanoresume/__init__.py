"""nanoresume: train small GPTs with plain PyTorch and never lose work.

One call trains (or continues) a run, in a notebook or a program::

    import nanoresume
    result = nanoresume.train(out_dir="runs/a", max_steps=2000)

The checkpoint core is also a small library for training loops of your own::

    from nanoresume import Checkpointer, ResumableSampler, StopFlag

Its names (:data:`__all__`) are imported on first use, so ``import nanoresume`` stays light:
no torch until one is needed, and every ``--help`` stays fast.
"""

import importlib
import sys
import time
from typing import Any

__version__ = "0.1.0"

# When this process first imported nanoresume (before torch): the CLI's --time-limit counts from
# here, so the seconds spent importing torch, reading data and building the model count too.
PROCESS_STARTED = time.monotonic()

# The public API: one call that trains, and the parts for a training loop of your own: name -> the
# module that defines it (see the README, "Use it in your own loop").
_API = {
    "train": "nanoresume.api",  # one call: train or continue a run with the command line's settings; a RunResult
    "Checkpointer": "nanoresume.checkpointer",  # atomic, verified checkpoints of named objects; resume
    "StopFlag": "nanoresume.signals",  # SIGTERM/SIGINT/SIGUSR1/SIGHUP set a flag; exit code 128+signal
    "seed_everything": "nanoresume.state",  # Python, NumPy, torch and CUDA streams from one seed
    "capture_rng_state": "nanoresume.state",  # every random stream, as values safe to load
    "restore_rng_state": "nanoresume.state",
    "ResumableSampler": "nanoresume.data",  # batch `step` is a function of (seed, step)
    "load_checkpoint": "nanoresume.checkpoint",  # read any nanoresume file: checksum, then a safe load
    "first_difference": "nanoresume.compare",  # where two states differ, bit for bit (None: identical)
    "CheckpointError": "nanoresume.errors",
    "CheckpointWriteError": "nanoresume.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """``nanoresume.Checkpointer`` and the other public names, imported when first asked for."""
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


# The modules that do something when run with `python -m nanoresume.<module>`; the others are library code.
RUNNABLE_MODULES = ("__main__", *(f"tools.{name}" for name in (
    "commands", "cli", "sampling", "evaluation", "ckpt", "chaos_child", "selftest")))


def _refuse_a_library_module_run_as_a_command() -> None:
    """``python -m nanoresume.model`` would exit 0 having done nothing: say what to run instead.

    While ``-m`` imports this package, ``sys.argv[0]`` is ``"-m"``, and ``sys.orig_argv``
    (Python 3.10+) names the module. Any other import of the package is unaffected.
    """
    args = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in args[:-1]:
        return
    target = args[args.index("-m") + 1]
    package, _, module = target.partition(".")
    if package == __name__ and module and module not in RUNNABLE_MODULES:
        print(f"error: {target} is a library module, not a command; `nanoresume --help` (or "
              f"`python -m nanoresume --help`) lists the commands", file=sys.stderr)
        sys.exit(2)


_refuse_a_library_module_run_as_a_command()
