"""A real Jupyter kernel (ipykernel, started by jupyter_client) that tests run code in and interrupt.

The kernel is the one a notebook server starts (kernel spec ``python3``, with jupyter_client putting
this Python in place of ``python``), in a session of its own, so ``interrupt_kernel()`` sends SIGINT to
it alone, as a notebook's stop button does. Output is what a notebook shows: the stream, error, display
and result messages of each cell.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import time
from pathlib import Path
from typing import Optional

from jupyter_client import KernelManager

from tests.helpers import REPO

START_TIMEOUT = 120.0  # seconds; a loaded machine starts a kernel in a few


class Cell:
    """One execution: its output so far, read from the kernel's iopub channel."""

    def __init__(self, kernel: "Kernel", msg_id: str) -> None:
        self.kernel, self.msg_id = kernel, msg_id
        self.stdout = self.stderr = ""
        self.error: Optional[tuple[str, str]] = None  # (ename, evalue)
        self.displays: list[dict] = []  # the data (MIME type -> content) of each display and of the result
        self.done = False

    @property
    def shown_text(self) -> str:
        """The stream text and the plain-text form of each display and result, as a notebook shows them."""
        return self.stdout + self.stderr + "".join(str(data.get("text/plain", "")) for data in self.displays)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr + ("" if self.error is None else f"{self.error[0]}: {self.error[1]}")

    def _take(self, message: dict) -> None:
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                self.stdout += content["text"]
            else:
                self.stderr += content["text"]
        elif kind == "error":
            self.error = (content["ename"], content["evalue"])
        elif kind in ("display_data", "execute_result"):
            self.displays.append(content["data"])
        elif kind == "status" and content["execution_state"] == "idle":
            self.done = True

    def wait_until(self, found: "re.Pattern[str] | str", timeout: float = 240.0) -> "re.Match[str]":
        """Read output until ``found`` (a regex) matches it; the match."""
        pattern = re.compile(found)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output)
            if match:
                return match
            assert not self.done, f"the cell ended without {pattern.pattern!r}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern.pattern!r} in {timeout} s:\n{self.output[-3000:]}"
            self.kernel._pump(0.05)

    def wait(self, timeout: float = 240.0) -> "Cell":
        """Until the cell has ended (the kernel is idle again)."""
        deadline = time.monotonic() + timeout
        while not self.done:
            assert time.monotonic() < deadline, f"the cell did not end in {timeout} s:\n{self.output[-3000:]}"
            self.kernel._pump(0.1)
        return self


class Kernel:
    """``Kernel(cwd)``: a started kernel; :meth:`run` a cell, :meth:`start` one to interrupt, :meth:`close`."""

    def __init__(self, cwd: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd), env=env)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=START_TIMEOUT)
        self.cells: dict[str, Cell] = {}
        prefix = self.run("import sys; print(sys.prefix)").stdout.strip()
        assert prefix == sys.prefix, f"kernel spec python3 runs {prefix}, not this environment ({sys.prefix})"

    def start(self, code: str) -> Cell:
        cell = Cell(self, self.client.execute(code))
        self.cells[cell.msg_id] = cell
        return cell

    def run(self, code: str, timeout: float = 240.0) -> Cell:
        return self.start(code).wait(timeout)

    def interrupt(self) -> None:
        """What a notebook's stop button does: SIGINT to the kernel."""
        self.manager.interrupt_kernel()

    def pid(self) -> int:
        cell = self.run("import os; print(os.getpid())")
        assert cell.error is None, cell.output
        return int(cell.stdout.strip())

    def _pump(self, timeout: float) -> None:
        try:
            message = self.client.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return
        cell = self.cells.get(message.get("parent_header", {}).get("msg_id"))
        if cell is not None:
            cell._take(message)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
