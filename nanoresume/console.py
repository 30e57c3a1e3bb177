"""What a person reads: log lines through ``logging`` and, where someone watches, a progress bar.

Info lines go to stdout; warnings (``warning: ...``) and errors (``error: ...``) go
to stderr. The bar is drawn on stderr only when stderr is a terminal (or
``--progress`` forces it); otherwise a plain line every ``--log-interval`` steps
suits a cluster log. In a Jupyter or Colab notebook, where stderr is no terminal yet a
person watches, the bar is ``tqdm.auto``'s: a widget where ipywidgets is installed,
text otherwise; the evaluation lines are printed into the cell's output around it.

Output must never end a run: a stream that goes away (``| head``, a closed terminal, a
log on a full disk) is pointed at /dev/null and its lines are dropped, with one warning
on the other stream.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import weakref
from typing import IO, Optional

from tqdm import tqdm

LOGGER_NAME = "nanoresume"
log = logging.getLogger(LOGGER_NAME)

_gone: "weakref.WeakSet[IO[str]]" = weakref.WeakSet()  # streams that failed once: never written again


def _silence(stream: IO[str]) -> None:
    """Point a stream that went away at /dev/null, so the interpreter's last flush cannot fail either."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return  # no file descriptor (a StringIO, a closed file): dropping its lines is enough
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def silence_stdout() -> None:
    """Drop everything still to be printed on stdout: its reader has gone (``| head``), which is not an error."""
    if sys.stdout is not None:
        _gone.add(sys.stdout)
        _silence(sys.stdout)


def _mark_gone(name: str, stream: IO[str], error: Exception) -> None:
    _gone.add(stream)
    _silence(stream)
    reason = getattr(error, "strerror", None) or str(error)
    other = "stderr" if name == "stdout" else "stdout"
    write_line(other, f"warning: {name} went away ({reason}); its lines are dropped from here on")


def write_line(name: str, text: str) -> None:
    """Write one line to ``sys.stdout`` or ``sys.stderr`` (``name``) without ever raising.

    The stream is looked up now, so redirection by the caller works. A progress bar
    is cleared and redrawn around the line, so the two never mix.
    """
    stream = getattr(sys, name, None)
    if stream is None or stream in _gone:
        return
    text = _encodable(text, stream)
    try:
        tqdm.write(text, file=stream)
        stream.flush()
        return
    except (OSError, ValueError):
        pass  # the failure may be the bar's stream, cleared before the line: retry without the bar
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError) as e:
        _mark_gone(name, stream, e)


def _encodable(text: str, stream: IO[str]) -> str:
    """``text`` with what ``stream`` cannot encode (say a sample's U+FFFD on an ASCII console) replaced
    by ``?``: a character is no reason to lose the stream."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return text
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        return text.encode(encoding, errors="replace").decode(encoding)
    except LookupError:
        return text  # an encoding Python does not know: leave the text to the stream


class _LineFormatter(logging.Formatter):
    """``warning: ...`` and ``error: ...`` prefixes; info lines as they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _ConsoleHandler(logging.Handler):
    """Info (and below) to stdout, warnings and errors to stderr, through :func:`write_line`."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(_LineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        write_line("stderr" if record.levelno >= logging.WARNING else "stdout", self.format(record))


def configure_logging() -> None:
    """Print nanoresume's log lines on the console (idempotent), and only there: not also through
    handlers on the root logger. A program that adds its own handler to the ``nanoresume``
    logger first keeps full control: :class:`~nanoresume.trainer.Trainer` then leaves it alone."""
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
    log.setLevel(logging.INFO)
    log.propagate = False


def in_notebook() -> bool:
    """Whether this process is a Jupyter or Colab kernel: IPython's shell there is a ZMQInteractiveShell
    (Colab's derives from it). IPython is never imported here: a kernel has imported it already."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and "ipykernel" in sys.modules else None
    return any(kind.__name__ == "ZMQInteractiveShell" for kind in type(shell).__mro__)


def wants_bar(progress: Optional[bool], stream: Optional[IO[str]] = None) -> bool:
    """``--progress``/``--no-progress`` decide; unset, a bar only where a person watches stderr: a
    terminal, or a notebook's cell (``stream`` None: ``sys.stderr``)."""
    if progress is not None:
        return progress
    if stream is None and in_notebook():
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def format_elapsed(seconds: float) -> str:
    """``H:MM:SS``, e.g. ``0:07:37``."""
    return str(datetime.timedelta(seconds=int(seconds)))


class Console:
    """Training progress for a person: a tqdm bar, or a plain line every ``log_interval`` steps.

    ``started`` is a :func:`time.monotonic` reading: elapsed times count from it. ``quiet``:
    print nothing at all (the ranks other than 0 under torchrun; rank 0 speaks for the job).
    """

    def __init__(self, total_steps: int, initial_step: int, show_bar: bool, log_interval: int,
                 started: Optional[float] = None, stream: Optional[IO[str]] = None, quiet: bool = False) -> None:
        self._stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        bar, width = tqdm, {"dynamic_ncols": True}
        if show_bar and not quiet and stream is None and in_notebook():
            from tqdm.auto import tqdm as bar  # a widget where ipywidgets is installed, else the text bar
            width = {}  # a widget sizes itself
        # delay: the first draw comes with the first step, where a failing stream is caught, not here
        self.bar = bar(total=total_steps, initial=initial_step, disable=not show_bar or quiet, unit="step",
                       file=self._stream, delay=1e-9, **width)
        self.log_interval = log_interval
        self.started = time.monotonic() if started is None else started
        self._tokens, self._seconds = 0, 0.0  # training work since the last plain line

    def log(self, line: str) -> None:
        if not self.quiet:
            log.info(line)

    def warn(self, line: str) -> None:
        if not self.quiet:
            log.warning(line)

    def elapsed(self) -> str:
        return format_elapsed(time.monotonic() - self.started)

    def advance(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """Report a finished optimizer step: ``loss`` and ``lr`` are that step's, ``seconds`` its duration."""
        self._tokens += tokens
        self._seconds += seconds
        if not self.bar.disable:
            self._guarded_bar(loss, lr, tokens / seconds)
        elif step % self.log_interval == 0:
            rate = self._tokens / self._seconds if self._seconds > 0 else 0.0
            self.log(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | {self.elapsed()}")
        if step % self.log_interval == 0:
            self._tokens, self._seconds = 0, 0.0

    def _guarded_bar(self, loss: float, lr: float, tokens_per_second: float) -> None:
        # The postfix first, then the count: a redraw during update() shows this step's loss, not the last one's.
        try:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}",
                                 refresh=False)
            self.bar.update(1)
        except (OSError, ValueError) as e:
            self.bar.disable = True  # plain lines from here on, on stdout if that still works
            _mark_gone("stderr", self._stream, e)

    def close(self) -> None:
        try:
            self.bar.close()
        except (OSError, ValueError):
            self.bar.disable = True  # the stream is gone; nothing left to tidy on it


class TrainWindow:
    """Train losses and throughput since the last evaluation line (display only, not state)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def summary(self) -> tuple[Optional[float], Optional[float]]:
        """(mean train loss, tokens/s) since the last reset; (None, None) before any step."""
        if not self.losses:
            return None, None
        return sum(self.losses) / len(self.losses), self.tokens / (time.perf_counter() - self.started)
