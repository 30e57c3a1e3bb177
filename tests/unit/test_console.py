"""The console: the bar shows each step's own loss, lines go where they belong, a lost stream never raises."""

from __future__ import annotations

import io
import re
import sys
import types

import pytest

from nanoresume import console
from nanoresume.console import Console, TrainWindow, configure_logging, in_notebook, log, wants_bar, write_line


def test_the_bar_shows_the_loss_of_the_step_it_counts():
    stream = io.StringIO()
    bar = Console(total_steps=5, initial_step=0, show_bar=True, log_interval=100, stream=stream)
    bar.bar.mininterval, bar.bar.miniters = 0, 1  # draw every update
    losses = {step: 10.0 - step for step in range(1, 6)}
    for step, loss in losses.items():
        bar.advance(step, loss, lr=1e-3, tokens=100, seconds=0.01)
    bar.close()
    frames = re.findall(r"(\d)/5 \[[^\]]*loss=([\d.]+)", stream.getvalue())
    assert {int(step) for step, _ in frames} == set(losses)
    for step, shown in frames:
        assert float(shown) == losses[int(step)], f"step {step} shows loss {shown}"


def test_without_a_bar_a_plain_line_comes_every_log_interval_steps(capsys):
    configure_logging()
    plain = Console(total_steps=10, initial_step=0, show_bar=False, log_interval=4, stream=io.StringIO())
    for step in range(1, 11):
        plain.advance(step, loss=1.0 / step, lr=2e-3, tokens=1000, seconds=0.5)
    out = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].strip() for line in out] == ["step      4", "step      8"]
    assert re.fullmatch(r"step      4 \| loss 0\.2500 \| lr 2\.00e-03 \| 2,000 tok/s \| \d+:\d\d:\d\d", out[0])


def test_info_goes_to_stdout_and_warnings_and_errors_to_stderr_with_their_prefix(capsys):
    configure_logging()
    log.info("step 1")
    log.warning("disk nearly full")
    log.error("it broke")
    captured = capsys.readouterr()
    assert captured.out == "step 1\n"
    assert captured.err == "warning: disk nearly full\nerror: it broke\n"


class GonePipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_stdout_that_went_away_is_dropped_with_one_warning_on_stderr(monkeypatch, capsys):
    capsys.readouterr()
    gone = GonePipe()
    monkeypatch.setattr(sys, "stdout", gone)
    write_line("stdout", "step 1")
    write_line("stdout", "step 2")
    assert capsys.readouterr().err == "warning: stdout went away (Broken pipe); its lines are dropped from here on\n"
    assert gone in console._gone


def test_a_bar_whose_stream_went_away_switches_to_plain_lines(capsys):
    configure_logging()
    bar = Console(total_steps=4, initial_step=0, show_bar=True, log_interval=2, stream=GonePipe())
    bar.bar.mininterval, bar.bar.miniters = 0, 1
    for step in range(1, 5):
        bar.advance(step, loss=1.0, lr=1e-3, tokens=10, seconds=0.1)
    bar.close()
    out = capsys.readouterr().out
    assert "step      4 | loss 1.0000" in out


def test_the_bar_is_on_only_for_a_terminal_unless_a_flag_decides():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_bar(None, Terminal()) and not wants_bar(None, io.StringIO())
    assert wants_bar(True, io.StringIO()) and not wants_bar(False, Terminal())


def test_the_train_window_averages_the_losses_since_its_last_reset():
    window = TrainWindow()
    assert window.summary() == (None, None)
    window.add(1.0, 10)
    window.add(3.0, 10)
    assert window.summary()[0] == 2.0 and window.tokens == 20
    window.reset()
    assert window.summary() == (None, None)


def pretend_kernel(monkeypatch: pytest.MonkeyPatch, shell_class_name: str, subclass: bool = False) -> None:
    """What a kernel has imported: ipykernel, and IPython whose shell is of the class named."""
    shell = type(shell_class_name, (), {})
    if subclass:
        shell = type("Shell", (shell,), {})  # Colab's google.colab._shell.Shell derives from ZMQInteractiveShell
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))


@pytest.mark.parametrize("shell, subclass, notebook", [
    ("ZMQInteractiveShell", False, True),  # Jupyter
    ("ZMQInteractiveShell", True, True),  # Colab
    ("TerminalInteractiveShell", False, False),  # IPython in a terminal: its own stderr rule applies
])
def test_a_jupyter_or_colab_kernel_is_a_notebook_and_a_terminal_ipython_is_not(monkeypatch, shell, subclass,
                                                                                notebook):
    assert not in_notebook()  # pytest itself
    pretend_kernel(monkeypatch, shell, subclass)
    assert in_notebook() is notebook


def test_in_a_notebook_the_bar_is_on_unless_a_flag_turns_it_off(monkeypatch):
    pretend_kernel(monkeypatch, "ZMQInteractiveShell")
    assert wants_bar(None) and wants_bar(True) and not wants_bar(False)
    assert not wants_bar(None, io.StringIO())  # a stream of the caller's follows the terminal rule


def test_a_character_the_stream_cannot_encode_is_replaced_and_the_stream_kept(monkeypatch):
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    write_line("stdout", "sample: caf\u00e9 \ufffd")
    write_line("stdout", "next line")
    ascii_out.flush()
    assert ascii_out.buffer.getvalue() == b"sample: caf? ?\nnext line\n"
    assert ascii_out not in console._gone
