"""Every way to start nanoresume works, and none exits 0 having done nothing.

The installed ``nanoresume`` command exists where the package was pip-installed
(CI installs it into its venv); these tests look for it beside ``sys.executable``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

import nanoresume
from nanoresume.invocation import command_words
from nanoresume.tools import commands

from tests.helpers import REPO, run_main

INSTALLED = Path(sys.executable).parent / "nanoresume"


def run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED.is_file(), reason="nanoresume is not pip-installed beside this Python")
def test_the_installed_command_trains_lists_and_samples(tiny_cli_args, tmp_path, capsys):
    assert run([str(INSTALLED), "--version"]).stdout == f"nanoresume {nanoresume.__version__}\n"
    trained = run([str(INSTALLED), "train", *tiny_cli_args(max_steps=4, eval_interval=2)])
    assert trained.returncode == 0, trained.stderr
    assert "finished: 4 steps" in trained.stdout
    # The other commands through the function the installed script calls, in-process: the same dispatch.
    listed = run_main(commands.main, ["ckpt", "list", str(tmp_path / "out")], capsys)
    assert listed.returncode == 0 and "--resume auto would pick: step_00000004.pt" in listed.stdout
    sampled = run_main(commands.main, ["sample", "--ckpt", str(tmp_path / "out" / "best.pt"), "--prompt", "def ",
                                       "--max-new-tokens", "5", "--device", "cpu"], capsys)
    assert sampled.returncode == 0 and sampled.stdout.startswith("def "), sampled.stderr


def test_python_dash_m_nanoresume_lists_the_commands_and_refuses_unknown_ones():
    help_text = run([sys.executable, "-m", "nanoresume", "--help"])
    assert help_text.returncode == 0
    for name in ("train", "sample", "evaluate", "ckpt"):
        assert f"\n  {name} " in help_text.stdout
    assert run([sys.executable, "-m", "nanoresume", "--version"]).stdout == f"nanoresume {nanoresume.__version__}\n"
    unknown = run([sys.executable, "-m", "nanoresume", "trian"])
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command 'trian'" in unknown.stderr
    assert run([sys.executable, "-m", "nanoresume"]).returncode == 2  # no command: usage, not a silent 0


def run_as_main(module: str, args: list[str], capsys) -> str:
    """What ``python -m nanoresume.MODULE ARGS`` prints, run as ``__main__`` in this process (no torch import
    to pay for again): its ``if __name__ == "__main__"`` part parses ARGS as it would there."""
    def exit_now(code: int) -> None:  # os._exit, which a tool ends with after main(), would end pytest too
        raise SystemExit(code)

    capsys.readouterr()
    with mock.patch.object(sys, "argv", [f"nanoresume.{module}", *args]), mock.patch.object(os, "_exit", exit_now), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already (by the tests)
        try:
            runpy.run_module(f"nanoresume.{module}", run_name="__main__", alter_sys=False)
        except SystemExit as e:
            message = e.code if isinstance(e.code, str) else ""  # sys.exit("usage: ...") prints it to stderr
        else:
            message = ""
    captured = capsys.readouterr()
    return captured.out + captured.err + message


def test_python_dash_m_nanoresume_cli_trains_instead_of_exiting_0_silently(tiny_cli_args, tmp_path, capsys):
    """Its ``if __name__ == "__main__"`` part, run here as ``python -m`` runs it (no process to start)."""
    output = run_as_main("tools.cli", tiny_cli_args(max_steps=2, eval_interval=2), capsys)
    assert "finished: 2 steps" in output, output
    assert (tmp_path / "out" / "checkpoints" / "step_00000002.pt").is_file()


def refusal_as_run_by_dash_m(module: str, capsys) -> tuple[object, str]:
    """(exit code, stderr) of the package's check as ``python -m nanoresume.MODULE --help`` runs it while
    importing the package (``sys.argv[0]`` is ``"-m"`` then), called here; (None, "") if it lets it run."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["-m"]), \
            mock.patch.object(sys, "orig_argv", [sys.executable, "-m", f"nanoresume.{module}", "--help"], create=True):
        try:
            nanoresume._refuse_a_library_module_run_as_a_command()
        except SystemExit as e:
            return e.code, capsys.readouterr().err
    return None, ""


@pytest.mark.slow
def test_no_module_exits_0_having_done_nothing(capsys):
    """Each module either runs (its --help prints a usage line) or refuses in one line: it is a library.
    The refusal is decided as the package is imported by ``-m``, before torch is imported: one real process
    shows it, and the package's check is called here for every module, as ``-m`` calls it; the runnable
    modules run here."""
    modules = sorted(m.name.removeprefix("nanoresume.")
                     for m in pkgutil.walk_packages(nanoresume.__path__, "nanoresume."))
    assert set(nanoresume.RUNNABLE_MODULES) <= set(modules)
    proc = run([sys.executable, "-m", "nanoresume.model", "--help"], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: nanoresume.model is a library module"), proc.stderr
    for module in modules:
        if module in nanoresume.RUNNABLE_MODULES:
            output = run_as_main(module, ["--help"], capsys)
            assert "usage" in output.lower(), f"nanoresume.{module}: {output!r}"
            assert refusal_as_run_by_dash_m(module, capsys) == (None, ""), module
        else:
            code, stderr = refusal_as_run_by_dash_m(module, capsys)
            assert code == 2, f"nanoresume.{module} exited {code}: {stderr!r}"
            assert stderr.startswith(f"error: nanoresume.{module} is a library module"), stderr


@pytest.mark.parametrize("module", ["tools.cli", "tools.sampling", "tools.evaluation", "tools.ckpt"])
def test_every_tool_has_a_version_flag(module, capsys):
    tool = importlib.import_module(f"nanoresume.{module}")
    with pytest.raises(SystemExit) as exited:
        tool.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"nanoresume {nanoresume.__version__}\n"


def test_command_words_are_the_words_before_the_arguments_or_the_fallback(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "nanoresume", "train", "--max-steps", "5"], raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/nanoresume/__main__.py", "train", "--max-steps", "5"])
    assert command_words(["--max-steps", "5"]) == ["python3", "-m", "nanoresume", "train"]
    assert command_words(["--other"]) == ["nanoresume", "train"]  # not this process's command line


def test_command_words_name_a_console_script_as_typed(monkeypatch, tmp_path):
    script = tmp_path / "bin" / "nanoresume"
    script.parent.mkdir()
    script.write_text("#!/usr/bin/env python\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", str(script), "train", "--out-dir", "a b"],
                        raising=False)
    monkeypatch.setattr(sys, "argv", [str(script), "train", "--out-dir", "a b"])
    monkeypatch.setenv("PATH", str(script.parent))
    assert command_words(["--out-dir", "a b"]) == ["nanoresume", "train"]  # on PATH: its name
    monkeypatch.setenv("PATH", "")
    assert command_words(["--out-dir", "a b"]) == [str(script), "train"]  # not on PATH: its path


@pytest.mark.slow
def test_the_continue_command_is_the_one_run_and_works_for_a_path_with_spaces_and_quotes(tiny_cli_args, tmp_path,
                                                                                       capsys):
    out = tmp_path / "it's a run"
    command = [sys.executable, "-m", "nanoresume", "train", *tiny_cli_args(max_steps=20), "--out-dir", str(out)]
    # tests/harness's probe: a real SIGTERM to itself during step 3, inside the loop that owns SIGTERM
    env = dict(os.environ, PYTHONUNBUFFERED="1", NANORESUME_PROBE_SIGTERM="3",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "harness"), os.environ.get("PYTHONPATH", "")]))
    stopped_run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert stopped_run.returncode == 143, stopped_run.stdout + stopped_run.stderr
    [stopped] = [line for line in stopped_run.stdout.splitlines() if "Continue with: " in line]
    again = shlex.split(stopped.split("Continue with: ", 1)[1])
    assert again == [sys.executable, "-m", "nanoresume", "train", "--out-dir", str(out), "--resume", "auto"]
    # What `python -m nanoresume` runs, with the words after it, in this process:
    resumed = run_main(commands.main, again[3:], capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (out / "checkpoints" / "step_00000020.pt").is_file()
