"""What the inspection tools (sample, evaluate, ckpt) share: a one-line-error parser and error reporting.

A user mistake prints ``error: <what and how to fix it>`` on stderr and returns
exit code 2; no traceback is shown for anything a user can cause.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import OneLineErrorParser
from .errors import NanoresumeError


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows every default and whose flag errors are one line (exit 2)."""
    return OneLineErrorParser(prog=prog, description=description,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run the model; auto picks cuda when available")


def run_reporting_errors(body: Callable[[], int], quiet: bool = False) -> int:
    """Run a tool's body; turn every error a user can cause into one stderr line and an exit code.

    ``quiet``: exit with the code but print nothing (the ranks other than 0 under torchrun, which
    stop with the same error rank 0 reports).
    """
    try:
        return body()
    except NanoresumeError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unreadable file, permission denied, ...: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

