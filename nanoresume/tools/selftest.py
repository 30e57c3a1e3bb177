"""The self-test: prove, on this machine and with these settings, that a stopped run resumes bit-exactly.

Bit-exactness depends on things nanoresume does not control: the GPU and its kernels,
TF32, ``torch.compile``, thread counts, a model or loop of your own. So the self-test
checks it where it matters. It trains a short run in a temporary folder as real
processes stopped by real signals, and compares how each run ends, bit for bit, with a
run that was never stopped (:data:`SCENARIOS`):

- straight through (the reference);
- SIGTERM at a step, then ``--resume auto``;
- SIGKILL during a checkpoint write, then ``--resume auto``;
- three stops in a chain (SIGINT, SIGKILL at a step, SIGUSR1), each resumed.

Every process is the chaos harness's child (:mod:`nanoresume.tools.chaos_child`), so checkpoint
writes announce themselves and a kill can be aimed inside one. Progress is read from
the run's own ``OUT/metrics.jsonl`` (or, for a script that writes none, from its
checkpoint files); :mod:`nanoresume.tools.selftest_report` compares and explains.

``nanoresume train --self-test [flags]`` tests a training configuration
(:func:`self_test_training`); ``nanoresume self-test SCRIPT [ARGS]`` tests a script of your own
(:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ..atomic import is_temp_path
from .chaos import SLOW_LATER_ENV, SLOW_WRITES_SIGNAL, WatchedProcess, children, verified_steps
from ..checkpoint import STEP_PATTERN, step_path
from .clitools import exit_now, make_parser, run_reporting_errors
from ..config import SELF_TEST_STEPS, TrainConfig, command_line_flags, validate
from ..console import log
from ..errors import ConfigError, NanoresumeError, UserError
from ..rundir import RunDir
from . import selftest_report as report
from .selftest_runs import SCENARIOS, Outcome, Scenario, Stop, checkpoint_folder

MIN_STEPS = 8  # three chained stops need room between them
WRITE_DELAY = 0.002  # seconds per written chunk: a checkpoint write lasts long enough to kill inside it
POLL = 0.01  # seconds between looks at a run's progress
REFERENCE_TIMEOUT = 3600.0  # seconds the reference run may take unless --timeout says otherwise
TORCHRUN_FORWARDS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what torchrun passes on to its workers
# Flags that say how a run is started, not what it computes: the self-test sets them itself.
RUN_ONLY = ("out_dir", "resume", "time_limit", "progress")


class SelfTestError(NanoresumeError):
    """A run of the self-test did not go as planned (it crashed, or ended before a stop was due)."""


@dataclass
class Program:
    """How to start one run of what is under test: ``prefix + args + --out-dir OUT [--resume auto]``."""

    prefix: list[str]
    args: list[str]
    cwd: Path
    torchrun: bool = False  # the prefix starts torchrun, which has exit codes and signal handling of its own
    env: dict[str, str] = field(default_factory=dict)
    own_cache: bool = False  # a token cache beside the runs, so that the self-test leaves nothing behind

    def command(self, out: Path, resume: bool) -> list[str]:
        cache = ["--cache-dir", str(out.parent / "cache")] if self.own_cache else []
        return [*self.prefix, *self.args, *cache, "--out-dir", str(out), *(["--resume", "auto"] if resume else [])]




class _Progress:
    """The newest step a running process has trained, read as it appends to ``OUT/metrics.jsonl``;
    for a program that writes none, the newest checkpoint it has committed since it started."""

    def __init__(self, out: Path) -> None:
        self.out = out
        metrics = RunDir(out).metrics
        self.offset = metrics.stat().st_size if metrics.exists() else 0  # what earlier starts wrote says nothing
        self.step: Optional[int] = None
        self._partial = b""
        self._before = set(self._checkpoints())  # a resumed run's older checkpoints say nothing of its progress

    def _checkpoints(self) -> list[int]:
        names = [STEP_PATTERN.match(p.name) for p in checkpoint_folder(self.out).glob("step_*.pt")]
        return [int(m.group(1)) for m in names if m]

    def poll(self) -> Optional[int]:
        try:
            with open(RunDir(self.out).metrics, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # the run cut it back to its resume point
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            new = [step for step in self._checkpoints() if step not in self._before]
            return max(new) if new else None
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if "train/loss" in record:
                self.step = int(record["step"])
        return self.step


# ---- running the scenarios -----------------------------------------------------------------------

class Runner:
    """Starts the runs of a self-test in ``work`` and keeps track of them, so that none outlives it."""

    def __init__(self, program: Program, work: Path, timeout: float = REFERENCE_TIMEOUT, more_time: str = "") -> None:
        self.program = program
        self.work = work
        self.more_time = more_time  # how to allow a slow run more time, for the error of a run that took too long
        self.timeout = timeout  # seconds one process may take; :func:`run_self_test` sets it from the reference
        self.steps = 0  # the step every run ends at; set by the reference run
        self.live: list[WatchedProcess] = []

    def start(self, out: Path, resume: bool, slow_writes: bool = False) -> WatchedProcess:
        """Start one run; ``slow_writes``: once sent SLOW_WRITES_SIGNAL, its checkpoint writes last long
        enough to kill inside one."""
        env = {**self.program.env, **({SLOW_LATER_ENV: "1"} if slow_writes else {})}
        child = WatchedProcess(self.program.command(out, resume), WRITE_DELAY if slow_writes else 0.0,
                               env=env, cwd=self.program.cwd, own_group=True)
        self.live.append(child)
        return child

    def finish(self, child: WatchedProcess, what: str) -> int:
        try:
            code = child.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:  # a hang is a failure, not a wait forever
            child.kill()
            raise SelfTestError(f"{what} did not end within {self.timeout:.0f} s and was killed with every process "
                                f"it started; if it hangs, fix that{self.more_time}") from None
        finally:
            self.live.remove(child)
        return code

    def kill_all(self) -> None:
        for child in list(self.live):
            child.kill()
        self.live.clear()

    def run(self, scenario: Scenario) -> Outcome:
        """One scenario, start to finish; raises SelfTestError if a run does not go as planned."""
        out = self.work / scenario.folder
        outcome = Outcome(scenario, out)
        started = time.monotonic()
        for number, stop in enumerate(scenario.stops):
            if number:
                outcome.resumed.append(self._newest_verified(out))
            self._interrupt(self.start(out, resume=number > 0, slow_writes=stop.in_save), stop, outcome)
        if scenario.stops:
            outcome.resumed.append(self._newest_verified(out))
        child = self.start(out, resume=bool(scenario.stops))
        code = self.finish(child, f"the last run of {scenario.name!r}" if scenario.stops else "the reference run")
        if code != 0:
            raise SelfTestError(f"{scenario.name}: the run exited {code}{_tail(child)}")
        outcome.final = self._final_checkpoint(out, scenario.name)
        outcome.seconds = time.monotonic() - started
        return outcome

    def _interrupt(self, child: WatchedProcess, stop: Stop, outcome: Outcome) -> None:
        target = max(1, round(stop.at * self.steps))
        progress = _Progress(outcome.out)
        name = stop.signal.name
        deadline = time.monotonic() + self.timeout
        while (progress.poll() or 0) < target:
            if time.monotonic() > deadline:
                child.kill()
                self.live.remove(child)
                raise SelfTestError(f"{outcome.scenario.name}: the run did not reach step {target} within "
                                    f"{self.timeout:.0f} s")
            if child.process.poll() is not None:
                self.finish(child, name)
                raise SelfTestError(f"{outcome.scenario.name}: the run ended (exit {child.process.returncode}) "
                                    f"before step {target}, where {name} was due{_tail(child)}; it must save "
                                    f"checkpoints along the way, not only at the end")
            time.sleep(POLL)
        if stop.in_save:
            for pid in self._receivers(child, SLOW_WRITES_SIGNAL):
                os.kill(pid, SLOW_WRITES_SIGNAL)
            writes = child.writes_started
            while child.writes_started == writes and child.process.poll() is None:
                time.sleep(POLL / 10)
            time.sleep(WRITE_DELAY)  # a chunk or so into the write
        if stop.graceful:
            for pid in self._receivers(child, stop.signal):
                os.kill(pid, stop.signal)
            code = self.finish(child, f"the run stopped by {name}")
            expected = 128 + stop.signal
            if not self.program.torchrun and code != expected:
                raise SelfTestError(f"{outcome.scenario.name}: {name} should stop the run with exit code "
                                    f"{expected}, not {code}{_tail(child)}")
            outcome.stopped.append(str(self._newest_verified(outcome.out)))
            return
        child.kill()
        self.live.remove(child)
        step = progress.poll()
        exact = RunDir(outcome.out).metrics.exists()
        # The kill cut a write exactly when it left a temp file (the next start removes it).
        cut = any(is_temp_path(p) for p in checkpoint_folder(outcome.out).iterdir())
        outcome.stopped.append(("" if exact else ">=") + str(step) + (" (in a write)" if cut else ""))

    def _receivers(self, child: WatchedProcess, sig: signal.Signals) -> list[int]:
        """Who gets a signal: the process, which under torchrun forwards SIGTERM, SIGINT and SIGHUP to
        its workers. Other signals (SIGUSR1, SLOW_WRITES_SIGNAL) would end torchrun itself, so they go to
        every worker directly, as SLURM delivers them to every process of a job step."""
        if self.program.torchrun and sig not in TORCHRUN_FORWARDS:
            return children(child.process.pid)
        return [child.process.pid]

    def _newest_verified(self, out: Path) -> int:
        """The step ``--resume auto`` continues from: the newest checkpoint that verifies (0: none)."""
        return max(verified_steps(checkpoint_folder(out)), default=0)

    def _final_checkpoint(self, out: Path, what: str) -> Path:
        found = verified_steps(checkpoint_folder(out))
        if not found:
            raise SelfTestError(f"{what}: the run wrote no step checkpoint in {out} or {out / 'checkpoints'}; "
                                f"save with nanoresume.Checkpointer into the folder --out-dir names")
        step = max(found)
        if self.steps and step != self.steps:
            raise SelfTestError(f"{what}: the run ended at step {step}, the reference at step {self.steps}")
        return step_path(checkpoint_folder(out), step)


def _tail(child: WatchedProcess) -> str:
    lines = [line for line in child.stderr_tail if line.strip()]
    return f": {lines[-1]}" if lines else ""


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP end the self-test like Ctrl-C does, through its cleanup (no leftovers)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


SCENARIO_NAMES = tuple(s.folder for s in SCENARIOS[1:])  # what --scenarios may name


def chosen_scenarios(names: Optional[Sequence[str]]) -> tuple[Scenario, ...]:
    """The reference and the scenarios whose ``folder`` is in ``names`` (None: all of :data:`SCENARIOS`)."""
    if names is None:
        return SCENARIOS
    unknown = [name for name in names if name not in SCENARIO_NAMES]
    if unknown:
        raise ValueError(f"unknown self-test scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIO_NAMES)}")
    return (SCENARIOS[0], *(s for s in SCENARIOS[1:] if s.folder in names))


def run_self_test(program: Program, describe: str, hints: list[str],
                  prepare: Optional[Callable[[Path], None]] = None,
                  scenarios: Optional[Sequence[str]] = None, timeout: Optional[float] = None,
                  more_time: str = "") -> int:
    """Run every scenario of :data:`SCENARIOS` for ``program``; print the table and the verdict.

    ``describe`` is the first line's account of what is tested; ``hints`` name the common causes
    of a difference with these settings (see :mod:`nanoresume.tools.selftest_report`); ``prepare(work)``
    does, once, what every run would otherwise do first (fill a token cache), so that the
    reference run times what the others will repeat. ``scenarios``: the folder names of the
    scenarios to run after the reference (default: all; ``nanoresume self-test --scenarios``).
    ``timeout``: seconds any one run may take (default: :data:`REFERENCE_TIMEOUT` for the reference,
    then ten times what it took, at least 120); a run still going then is killed with all it started,
    and the error ends with ``more_time`` (how to allow more).
    Returns 0 if every run ended bit-exactly as the reference did, else 1.
    """

    chosen = chosen_scenarios(scenarios)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="nanoresume-self-test-"))
    runner = Runner(program, work, timeout or REFERENCE_TIMEOUT, more_time)
    print(f"self-test: {describe}; {len(chosen)} scenarios, "
          f"{sum(len(s.stops) + 1 for s in chosen)} runs, in {work} (removed at the end)", flush=True)
    try:
        with _interruptible():
            if prepare is not None:
                prepare(work)
            reference = runner.run(chosen[0])
            runner.steps = int(STEP_PATTERN.match(reference.final.name).group(1))
            runner.timeout = timeout or max(120.0, 10 * reference.seconds)
            print(f"reference run: {runner.steps} steps in {reference.seconds:.0f} s; the other runs take about "
                  f"{report.estimate_rest(reference, runner.steps, chosen[1:]):.0f} s more", flush=True)
            outcomes = [reference] + [runner.run(s) for s in chosen[1:]]
            findings = [report.compare(reference, o) for o in outcomes]
            print(report.table(outcomes, findings))
            print(report.verdict(outcomes, findings, time.monotonic() - started, hints))
            return 0 if all(f is None for f in findings) else 1
    finally:
        runner.kill_all()
        shutil.rmtree(work, ignore_errors=True)


# ---- nanoresume train --self-test ----------------------------------------------------------------

def self_test_training(cfg: TrainConfig, explicit: set[str], processes: int = 0,
                       scenarios: Optional[Sequence[str]] = None) -> int:
    """``nanoresume train --self-test``: the run ``cfg`` describes, ``--max-steps`` SELF_TEST_STEPS unless
    given, checkpoints every fifth of the run unless ``--ckpt-interval`` is given. ``processes`` > 0:
    every run under torchrun with that many processes. ``scenarios``: as for :func:`run_self_test`."""

    if "RANK" in os.environ:
        raise UserError("--self-test starts its own training processes: run it without torchrun, and add "
                        "--self-test-nproc N to run every one of them under torchrun with N processes")
    cfg = _self_test_config(cfg, explicit)
    ignored = sorted(name for name in RUN_ONLY if name in explicit)
    if ignored:
        log.warning(f"--self-test ignores {', '.join('--' + n.replace('_', '-') for n in ignored)}: it trains "
                    f"in a temporary folder it removes at the end")
    prefix = [sys.executable, "-m", "nanoresume.tools.chaos_child", "child"]
    if processes:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                  "--monitor-interval=0.5", "-m", "nanoresume.tools.chaos_child", "child"]
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "resume")}
    program = Program(prefix, command_line_flags(values), Path.cwd(), torchrun=processes > 0,
                      env=_package_on_path(), own_cache=cfg.cache_dir is None)
    return run_self_test(program, report.describe_training(cfg, processes), report.training_hints(cfg),
                         prepare=_token_cache_filler(cfg) if program.own_cache else None, scenarios=scenarios)


def _self_test_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The config every run of the self-test trains."""
    steps = cfg.max_steps if "max_steps" in explicit else SELF_TEST_STEPS
    if steps < MIN_STEPS:
        raise ConfigError(f"--max-steps {steps}: --self-test needs at least {MIN_STEPS} steps to stop a run "
                          f"three times")
    interval = cfg.ckpt_interval if "ckpt_interval" in explicit else max(1, steps // 5)
    cfg = replace(cfg, max_steps=steps, ckpt_interval=interval, time_limit=None, progress=False, resume="none")
    problems = validate(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def _token_cache_filler(cfg: TrainConfig) -> Callable[[Path], None]:
    """Tokenize the data into the self-test's own cache (``WORK/cache``, see :meth:`Program.command`)."""
    def fill(work: Path) -> None:
        from ..data import load_tokens

        load_tokens(cfg.data, cfg.val_fraction, str(work / "cache"), cfg.token_dtype, cfg.vocab_size,
                    warn=log.warning)

    return fill


def _package_on_path() -> dict[str, str]:
    """``-m nanoresume.tools.chaos_child`` must find this very package from any folder, installed or not."""
    root = str(Path(__file__).resolve().parents[2])  # the folder holding nanoresume/
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": root + (os.pathsep + existing if existing else "")}


# ---- nanoresume self-test SCRIPT [ARGS] ----------------------------------------------------------

DESCRIPTION = """\
Prove that a training script of your own resumes bit-exactly: run it straight through, stopped by
SIGTERM, killed with SIGKILL during a checkpoint write, and stopped three times in a chain, each
resumed, then compare how the runs end, bit for bit. The script must take --out-dir DIR (and
--resume auto), keep its nanoresume.Checkpointer folder in DIR or DIR/checkpoints, save along the
way and at its last step, and stop gracefully on SIGTERM, SIGINT and SIGUSR1 (exit 128+signal).
If it writes DIR/metrics.jsonl lines such as {"step": 7, "train/loss": 2.31}, every step's loss is
compared too. Exit 0: bit-exact; 1: not; 2: a usage error."""


def scenario_names(text: str) -> list[str]:
    """``--scenarios sigterm,sigkill`` -> the names, each one of :data:`SCENARIO_NAMES`, or a UserError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIO_NAMES]
    if unknown or not names:
        problem = f"unknown scenario {', '.join(unknown)}" if unknown else "no scenario named"
        raise UserError(f"--scenarios {text}: {problem}; name one or more of {', '.join(SCENARIO_NAMES)}, "
                        f"separated by commas")
    return names


def main(argv: Optional[Sequence[str]] = None, prog: str = "nanoresume self-test") -> int:
    """``nanoresume self-test SCRIPT [ARGS...]`` (also ``python -m nanoresume.tools.selftest``)."""

    parser = make_parser(prog, DESCRIPTION)
    parser.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"seconds any one run may take before it is killed with all it started "
                             f"(default: {REFERENCE_TIMEOUT:.0f} for the first run, then ten times what it took, "
                             f"at least 120)")
    parser.add_argument("--scenarios", default=argparse.SUPPRESS, metavar="NAMES",
                        help=f"comma-separated: run only these scenarios after the straight run, of "
                             f"{', '.join(SCENARIO_NAMES)} (default: all), e.g. to try a fix quickly")
    parser.add_argument("script", help="the training script to test, e.g. examples/own_loop.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="flags given to every run of the script")
    options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))

    def body() -> int:
        script = Path(options.script)
        timeout = getattr(options, "timeout", None)
        if timeout is not None and not 0 < timeout < float("inf"):
            raise UserError(f"--timeout {timeout:g}: give a number of seconds above 0")
        scenarios = getattr(options, "scenarios", None)
        scenarios = None if scenarios is None else scenario_names(scenarios)
        if not script.is_file():
            raise UserError(f"{options.script}: no such script; pass the path of a Python training script")
        program = Program([sys.executable, "-m", "nanoresume.tools.chaos_child", "script", str(script)],
                          list(options.args), Path.cwd(), env=_package_on_path())
        return run_self_test(program, f"{' '.join([str(script), *options.args])}", report.script_hints(),
                             scenarios=scenarios, timeout=timeout,
                             more_time=", or if it is only slow, allow more with --timeout SECONDS")

    return run_reporting_errors(body)


if __name__ == "__main__":

    exit_now(main(prog="python -m nanoresume.tools.selftest"))
