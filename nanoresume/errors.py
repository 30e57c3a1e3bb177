"""Exceptions that carry a one-line message for the user, and the exit code to use.

The CLI prints ``error: <message>`` and exits with ``exit_code``; library callers
catch them like any other exception. No traceback is ever shown for these.
"""


class NanoresumeError(Exception):
    """Base class: a failure with a message written for the user."""

    exit_code = 1


class UserError(NanoresumeError, ValueError):
    """Something the user can fix: a flag, a path, a config mismatch (exit 2)."""

    exit_code = 2


class ConfigError(UserError):
    """A flag has a bad value; the message names the flag."""


class DataError(UserError):
    """The training data is missing, empty, unreadable or too small."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt, unsafe or incompatible."""


class CheckpointWriteError(NanoresumeError):
    """A checkpoint could not be written (disk full, I/O error); earlier ones are intact.

    ``problem`` is what failed, without advice, for callers that give their own fix.
    """

    def __init__(self, problem: str, advice: str = "") -> None:
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem = problem


class NonFiniteLossError(NanoresumeError):
    """The training loss became NaN or infinite; nothing was saved from that step."""
