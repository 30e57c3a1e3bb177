"""The installed ``nanoresume`` command (also ``python -m nanoresume``): one word picks the tool.

    nanoresume train --out-dir runs/a          # nanoresume.tools.cli
    nanoresume sample --ckpt runs/a/best.pt    # nanoresume.tools.sampling
    nanoresume evaluate --ckpt ... --data ...  # nanoresume.tools.evaluation
    nanoresume ckpt list runs/a                # nanoresume.tools.ckpt
    nanoresume self-test my_train.py           # nanoresume.tools.selftest

Each tool keeps its own flags and ``--help``; this module only dispatches.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from .. import __version__
from .clitools import exit_now
from ..invocation import command_words, shell_command

# command -> (module with main(argv, prog), one line for --help)
TOOLS: dict[str, tuple[str, str]] = {
    "train": ("nanoresume.tools.cli", "train a model; stop it any way you like, continue with --resume auto"),
    "sample": ("nanoresume.tools.sampling", "generate text from a checkpoint"),
    "evaluate": ("nanoresume.tools.evaluation", "loss and perplexity of a checkpoint on a whole file"),
    "ckpt": ("nanoresume.tools.ckpt", "list, verify, show, diff and export checkpoints"),
    "self-test": ("nanoresume.tools.selftest", "prove that a training script of your own resumes bit-exactly"),
}


def usage(prog: str) -> str:
    width = max(len(name) for name in TOOLS)
    lines = [f"usage: {prog} COMMAND [FLAGS...]", "",
             "Train small GPTs in plain PyTorch and never lose work.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help}" for name, (_, help) in TOOLS.items()]
    lines += ["", f"'{prog} COMMAND --help' lists a command's flags; '{prog} --version' prints the version."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = shell_command(command_words(argv, fallback=("nanoresume",)))
    if not argv:
        print(usage(prog), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage(prog))
        return 0
    if name == "--version":
        print(f"nanoresume {__version__}")
        return 0
    if name not in TOOLS:
        print(f"{prog}: error: unknown command {name!r}; choose one of {', '.join(TOOLS)} (see --help)",
              file=sys.stderr)
        return 2
    tool = importlib.import_module(TOOLS[name][0])
    return tool.main(rest, prog=f"{prog} {name}")


def run() -> None:
    """The console script: :func:`main`, then a fast exit once everything is flushed and closed."""
    exit_now(main())


if __name__ == "__main__":
    run()
