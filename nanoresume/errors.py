"""Exceptions that carry a one-line message for the user, and the exit code to use.

The CLI prints ``error: <message>`` and exits with ``exit_code``; library callers
catch them like any other exception. No traceback is ever shown for these.

Checkpoint errors say what is wrong (``problem``) and what would fix it (``advice``) in library
terms. Those whose fix a caller may word in its own terms carry a ``remedy`` (one of the
``REMEDY_*`` names); :meth:`CheckpointError.reworded` swaps the advice for the caller's, as the
training command does to name its flags.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, TypeVar

REMEDY_FREE_SPACE = "free space"  # a write failed (disk full, I/O error); earlier checkpoints are intact
REMEDY_MOVE_OBSTACLE = "move obstacle"  # something that is not a checkpoint holds a checkpoint's name
REMEDY_RESUME_OR_ELSEWHERE = "resume or elsewhere"  # a fresh start asked for where checkpoints exist
REMEDY_NONE_USABLE = "none usable"  # checkpoints exist and none can be resumed from

_Advised = TypeVar("_Advised", bound="_Advice")


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


class _Advice:
    """``problem; advice`` as the message, with both parts (and the facts the advice may name) kept."""

    def __init__(self, problem: str, advice: str = "", remedy: Optional[str] = None, **facts: Any) -> None:
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem, self.advice, self.remedy, self.facts = problem, advice, remedy, facts

    def reworded(self: _Advised, advice: Mapping[str, str]) -> _Advised:
        """This error with the caller's advice for its remedy: ``advice[remedy]``, a template that may
        use ``{advice}`` (the library's) and the error's facts (such as ``{folder}``). Itself if
        ``advice`` has nothing for its remedy."""
        template = advice.get(self.remedy) if self.remedy is not None else None
        if template is None:
            return self
        text = template.format(advice=self.advice, **self.facts)
        return type(self)(self.problem, text, self.remedy, **self.facts)


class CheckpointError(_Advice, UserError):
    """A checkpoint file is missing, corrupt, unsafe or incompatible."""


class CheckpointWriteError(_Advice, NanoresumeError):
    """A checkpoint could not be written (disk full, I/O error); earlier ones are intact.

    ``problem`` is what failed, without advice, for callers that give their own fix.
    """


class NonFiniteLossError(NanoresumeError):
    """The training loss became NaN or infinite; nothing was saved from that step."""
