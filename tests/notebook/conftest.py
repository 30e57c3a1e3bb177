"""One real Jupyter kernel for every notebook test of a pytest process: starting one (and importing torch
in it) costs seconds of CPU, and what a test does in it is undone or fresh for each test (its own OUT,
its own working directory and environment, set and put back by the test)."""

from __future__ import annotations

import pytest

from tests.notebook.kernel import Kernel


@pytest.fixture(scope="session")
def notebook_kernel(tmp_path_factory):
    """The kernel, with ``first_pid``: its process id at start (a test that kills it shows)."""
    kernel = Kernel(tmp_path_factory.mktemp("kernel"))
    kernel.first_pid = kernel.pid()
    yield kernel
    kernel.close()
