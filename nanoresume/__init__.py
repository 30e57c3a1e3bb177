"""nanoresume: train small GPTs with plain PyTorch and never lose work."""

import sys
import time

__version__ = "0.1.0"

# When this process first imported nanoresume (before torch): the CLI's --time-limit counts from
# here, so the seconds spent importing torch, reading data and building the model count too.
PROCESS_STARTED = time.monotonic()

# The modules that do something when run with `python -m nanoresume.<module>`; the others are library code.
RUNNABLE_MODULES = ("__main__", "commands", "cli", "sampling", "evaluation", "ckpt", "chaos", "selftest")


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
