"""What the tools share: a one-line-error parser, error reporting, and the fast exit of a finished process.

A user mistake prints ``error: <what and how to fix it>`` on stderr and returns
exit code 2; no traceback is shown for anything a user can cause.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable, NoReturn, Optional

from .. import __version__
from ..config import OneLineErrorParser
from ..console import configure_logging, log, silence_stdout
from ..errors import NanoresumeError
from ..signals import StopFlag, last_committed
from ..versions import untested_versions

# A reader that stops early (`| head`) is not an error: exit quietly, as a tool killed by SIGPIPE does.
BROKEN_PIPE_EXIT_CODE = 128 + signal.SIGPIPE


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows every default and whose flag errors are one line (exit 2)."""
    parser = OneLineErrorParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nanoresume {__version__}")
    return parser


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run the model; auto picks cuda when available")


def add_mirror_option_flag(parser: argparse.ArgumentParser) -> None:
    """``--mirror-option KEY=VALUE``: how a tool reaches a checkpoint given as a URL on a mirror."""
    parser.add_argument("--mirror-option", action="append", default=None, metavar="KEY=VALUE",
                        help="with a URL checkpoint (s3://bucket/run/best.pt): a storage option, as in train's "
                             "--mirror-option (repeatable)")


def run_reporting_errors(body: Callable[[], int], quiet: bool = False) -> int:
    """Run a tool's body; turn every error a user can cause into one stderr line and an exit code.

    ``quiet``: exit with the code but print nothing (the ranks other than 0 under torchrun, which
    stop with the same error rank 0 reports).
    """
    configure_logging()
    older = untested_versions()
    if older is not None and not quiet:
        log.warning(older)
    try:
        code = body()
        sys.stdout.flush()  # a reader that left early shows up here, not as noise at interpreter exit
        return code
    except NanoresumeError as e:
        if not quiet:
            log.error(str(e))
        return e.exit_code
    except BrokenPipeError:  # stdout's reader is gone, e.g. `nanoresume ckpt show X | head -1`
        silence_stdout()
        return BROKEN_PIPE_EXIT_CODE
    except OSError as e:  # unreadable file, permission denied, ...: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        log.error(f"{where}{e.strerror or e}; check the path and its permissions")
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def forced_exit(signum: int, last_committed_step: Optional[int]) -> NoReturn:
    """A forced stop of a command-line run (a second signal, or one during teardown): one line by
    ``os.write``, then ``os._exit(128 + signal)``. It runs in a signal handler, between two bytecodes
    of whatever was interrupted, which may hold any lock (sys.stderr's included), so nothing here may
    print, flush, log or run cleanup."""
    try:
        os.write(2, f"forced exit; {last_committed(last_committed_step)}\n".encode())
    except OSError:
        pass  # stderr is gone; the exit code still tells
    os._exit(128 + signum)


def command_line_stop_flag() -> StopFlag:
    """The stop flag of a command-line run: a forced stop ends the process (:func:`forced_exit`)."""
    return StopFlag(forced_exit=forced_exit)


def exit_now(code: int) -> NoReturn:
    """End the process once :func:`main` has returned, skipping the interpreter's teardown.

    By then every checkpoint is committed and every file, writer and thread of the run
    is closed (Trainer.run closes them before returning); what is left is flushing the
    standard streams and log handlers. Tearing down torch's modules would take about a
    second more, which counts against a preemption grace period. Only for processes:
    library code returns instead.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can reach it
    os._exit(code)
