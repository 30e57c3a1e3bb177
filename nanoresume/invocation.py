"""How the user started this process, as words to paste back into a shell.

The stop message ends with "Continue with: ...". That command must be the one the
user actually ran (``nanoresume train``, ``python -m nanoresume train``,
``python scripts/train.py``, ...), not a path that may not exist where they are,
and it must survive paths with spaces or quotes: :func:`shell_command` quotes it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_TRAIN_COMMAND = ("nanoresume", "train")  # library use: no command line to repeat


def command_words(args: Sequence[str], fallback: Sequence[str] = DEFAULT_TRAIN_COMMAND) -> list[str]:
    """The words that came before ``args`` on this process's command line.

    ``args`` are the arguments the tool parsed (for ``nanoresume train --max-steps 5``
    that is ``["--max-steps", "5"]``, and the answer is ``["nanoresume", "train"]``).
    Returns ``fallback`` when ``args`` are not the end of the command line (a tool
    called from Python, not from a shell).
    """
    full = _command_line()
    args = list(args)
    if len(full) <= len(args) or (args and full[-len(args):] != args):
        return list(fallback)
    return full[:len(full) - len(args)]


def shell_command(words: Sequence[str]) -> str:
    """``words`` as one shell command line, each quoted only where it needs it."""
    return " ".join(shlex.quote(word) for word in words)


def _command_line() -> list[str]:
    """This process's command line: interpreter, its options, the script or ``-m module``, arguments."""
    full = list(getattr(sys, "orig_argv", None) or _rebuilt_command_line())  # orig_argv: Python >= 3.10
    script = sys.argv[0] if sys.argv else ""
    if len(full) >= 2 and full[1] == script and _is_console_script(script):
        # pip's console scripts run through their #! line: the user typed the script, not python
        name = os.path.basename(script)
        found = shutil.which(name)
        on_path = found is not None and os.path.realpath(found) == os.path.realpath(script)
        return [name if on_path else script, *full[2:]]
    return full


def _is_console_script(path: str) -> bool:
    return bool(path) and not path.endswith(".py") and os.path.isfile(path) and os.access(path, os.X_OK)


def _rebuilt_command_line() -> list[str]:
    """Python 3.9 has no ``sys.orig_argv``: rebuild it, turning a module run with ``-m`` back into ``-m``."""
    interpreter = sys.executable or "python"
    if not sys.argv:
        return [interpreter]
    script = Path(sys.argv[0]).resolve() if sys.argv[0] else None
    if script is not None and script.parent == PACKAGE_DIR and script.suffix == ".py":
        module = "nanoresume" if script.stem == "__main__" else f"nanoresume.{script.stem}"
        return [interpreter, "-m", module, *sys.argv[1:]]
    return [interpreter, *sys.argv]
