"""The declared floors are the tested ones: setup.cfg, .ci/run and nanoresume.versions agree."""

from __future__ import annotations

import configparser
import re
import sys

import torch

from nanoresume.versions import MIN_PYTHON, MIN_TORCH, release, untested_versions
from tests.helpers import REPO


def options() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser["options"]


def test_setup_cfg_declares_the_floors_the_code_checks():
    assert options()["python_requires"].strip() == ">=%d.%d" % MIN_PYTHON
    torch_line = next(line.strip() for line in options()["install_requires"].splitlines() if line.startswith("torch"))
    assert torch_line == "torch>=%d.%d" % MIN_TORCH


def test_ci_tests_exactly_the_torch_floor():
    ci = (REPO / ".ci" / "run").read_text()
    pinned = re.search(r'"torch==([\d.]+)"', ci).group(1)
    assert release(pinned)[:2] == MIN_TORCH


def test_this_process_runs_on_versions_at_or_above_the_floors():
    assert sys.version_info[:2] >= MIN_PYTHON and release(torch.__version__)[:2] >= MIN_TORCH
    assert untested_versions() is None


def test_older_versions_are_one_line_naming_each_and_the_fix():
    line = untested_versions(python="3.10.12", torch="2.4.1+cu121")
    assert line.startswith("Python 3.10.12 (needs 3.11+) and torch 2.4.1+cu121 (needs 2.13+) is older than")
    assert "\n" not in line and 'pip install "torch>=2.13"' in line
    assert untested_versions(python="3.12.1", torch="2.12.0").startswith("torch 2.12.0 (needs 2.13+)")
    assert untested_versions(python="3.11.0", torch="2.14.0.dev20260101") is None


def test_release_reads_local_and_development_versions():
    assert release("2.13.0+cpu") == (2, 13, 0) and release("2.14.0.dev20260101") == (2, 14, 0)
    assert release("") == ()


def test_every_tool_says_so_in_one_line_before_it_starts(monkeypatch, capfd):
    from nanoresume.tools import clitools

    monkeypatch.setattr(clitools, "untested_versions", lambda: "torch 2.4.1 (needs 2.13+) is older than ...")
    assert clitools.run_reporting_errors(lambda: 0) == 0
    assert capfd.readouterr().err.strip() == "warning: torch 2.4.1 (needs 2.13+) is older than ..."
