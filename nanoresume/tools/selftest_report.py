"""What the self-test prints: the comparison of each run with the reference, the table, the verdict and
the likely causes of a difference, named the way a person would look for them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .chaos import comparable_state
from .ckpt import describe_tensor_difference
from ..compare import Difference, find_difference, plain_equal
from ..config import TrainConfig
from ..training_state import (COUNTERS, HEADER, KIND, KIND_KEY, MODEL, OPTIMIZER, RANKS, RNG, SAMPLER, SCALER,
                              SCHEDULER, SETTINGS)
from ..rundir import RunDir
from .selftest_runs import Outcome, Scenario, read_losses

# Top-level keys of a checkpoint, as parts a person names (other keys keep their own names), in the
# order a difference is looked for: the weights and what updates them first, bookkeeping last.
# "rng" is a Checkpointer file's key for its random streams.
PART_NAMES = {MODEL: "model", OPTIMIZER: "optimizer", SCHEDULER: "scheduler", SCALER: "gradient scaler",
              RANKS: "RNG streams", "rng": "RNG streams", SAMPLER: "data position",
              **dict.fromkeys(COUNTERS, "counters"), **dict.fromkeys(SETTINGS, "settings")}
_HEADER = HEADER


@dataclass
class Finding:
    """How one run's end differs from the reference's."""

    outcome: Outcome
    loss_step: Optional[int]  # the first step whose training loss differs (or is missing from one run)
    losses: tuple[Any, Any]  # that step's loss in the reference and in this run
    state: Optional[Difference]  # the first difference in the final checkpoints
    reference_state: dict[str, Any]
    differing: list[str]  # parts of the final state that differ
    identical: list[str]


def compare(reference: Outcome, outcome: Outcome) -> Optional[Finding]:
    """None if ``outcome`` ended exactly as ``reference`` did: every step's loss (where the program
    records them) and the whole final checkpoint, bit for bit."""
    if outcome is reference:
        return None
    loss_step, losses = None, (None, None)
    expected, found = read_losses(reference.out), read_losses(outcome.out)
    if expected is not None and found is not None:
        for step in sorted(expected.keys() | found.keys()):
            a, b = expected.get(step, "missing"), found.get(step, "missing")
            if not plain_equal(a, b):
                loss_step, losses = step, (a, b)
                break
    a, b = _in_order(comparable_state(reference.final)), _in_order(comparable_state(outcome.final))
    state = find_difference(a, b)
    if loss_step is None and state is None:
        return None
    parts_a, parts_b = _parts(a), _parts(b)
    differing = [name for name in parts_a if find_difference(parts_a[name], parts_b.get(name)) is not None]
    return Finding(outcome, loss_step, losses, state, a, differing, [n for n in parts_a if n not in differing])


def _in_order(state: dict[str, Any]) -> dict[str, Any]:
    """The state with its top-level keys in :data:`PART_NAMES` order, so that the first difference
    found is the most telling one (a weight rather than a counter)."""
    rank = {key: i for i, key in enumerate(PART_NAMES)}
    ordered = dict(sorted(state.items(), key=lambda item: rank.get(item[0], -1)))
    if isinstance(ordered.get("objects"), dict):  # a Checkpointer file: its objects the same way
        ordered["objects"] = _in_order(ordered["objects"])
    return ordered


def _parts(state: dict[str, Any]) -> dict[str, list[Any]]:
    """The state in the parts a person names: model, optimizer, RNG streams, data position, counters..."""
    if state.get("kind") == "state":  # a Checkpointer file: the objects by name, and the RNG streams
        state = {**state["objects"], "rng": state.get("rng"), "step": state["step"]}
    parts: dict[str, list[Any]] = {}
    for key, value in state.items():
        if key not in _HEADER:
            parts.setdefault(PART_NAMES.get(key, key), []).append(value)
    return parts


# ---- the table and the verdict -------------------------------------------------------------------

def table(outcomes: Sequence[Outcome], findings: Sequence[Optional[Finding]]) -> str:
    rows = [("scenario", "stopped after step", "resumed from", "result")]
    for outcome, finding in zip(outcomes, findings):
        if not outcome.scenario.stops:
            result = f"reference ({outcome.seconds:.0f} s)"
        elif finding is None:
            result = "bit-exact"
        elif finding.loss_step is not None:
            result = f"differs from step {finding.loss_step}"
        else:
            result = "final state differs"
        if outcome.scenario.stops:
            result += f" ({outcome.seconds:.0f} s)"
        rows.append((outcome.scenario.name, ", ".join(outcome.stopped) or "-",
                     ", ".join(map(str, outcome.resumed)) or "-", result))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def verdict(outcomes: Sequence[Outcome], findings: Sequence[Optional[Finding]], seconds: float,
            hints: list[str]) -> str:
    first = next((f for f in findings if f is not None), None)
    if first is None:
        compared = "every step's loss and the whole final state" if read_losses(outcomes[0].out) is not None \
            else "the whole final state"
        return (f"bit-exact on this machine with these settings ({compared}, bit for bit; "
                f"{seconds:.0f} s in all)")
    lines = [f"first difference: {describe(first)}",
             f"  in the run {first.outcome.scenario.name!r}; at the end these differ: "
             f"{', '.join(first.differing) or 'nothing'}; identical: {', '.join(first.identical) or 'nothing'}"]
    lines.append(f"  {where_it_began(first)}")
    lines.append("NOT bit-exact on this machine with these settings. Common causes:")
    lines += [f"  - {hint}" for hint in hints]
    return "\n".join(lines)


def describe(finding: Finding) -> str:
    """``loss at step 7 (2.3141 vs 2.3142); optimizer exp_avg of blocks.0.mlp.fc.weight differs: max abs diff ...``"""
    said = []
    if finding.loss_step is not None:
        a, b = distinct(*finding.losses)
        said.append(f"loss at step {finding.loss_step} ({a} vs {b})")
    difference = finding.state
    if difference is not None:
        if isinstance(difference.a, torch.Tensor) and isinstance(difference.b, torch.Tensor):
            detail = describe_tensor_difference(difference.a, difference.b)
        else:
            detail = difference.what
        said.append(f"{locate(difference, finding.reference_state)} differs: {detail}")
    return "; ".join(said)


def distinct(a: Any, b: Any) -> tuple[str, str]:
    """Two numbers with just enough digits to tell them apart: ``2.3141`` vs ``2.3142``."""
    if not (isinstance(a, float) and isinstance(b, float)):
        return (repr(a) if a is not None else "non-finite"), (repr(b) if b is not None else "non-finite")
    for digits in range(5, 18):
        shown = f"{a:#.{digits}g}", f"{b:#.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return repr(a), repr(b)


def locate(difference: Difference, state: dict[str, Any]) -> str:
    """Where a difference is, in words: ``model weight blocks.0.fc.weight``, ``optimizer exp_avg of ...``."""
    path = difference.path
    if state.get("kind") == "state" and path[:1] == ("objects",):
        path = path[1:]
    if len(path) == 2 and path[0] == MODEL:
        return f"model weight {path[1]}"
    if len(path) == 4 and path[:2] == (OPTIMIZER, "state"):
        return f"optimizer {path[3]} of {_parameter_name(state, path[2])}"
    if len(path) >= 4 and path[0] == RANKS and path[2] == RNG:
        return f"the {path[3]} random number stream of rank {path[1]}"
    if len(path) >= 2 and path[0] == "rng":
        return f"the {path[1]} random number stream"
    if path[:1] == (SAMPLER,):
        return "the data position (sampler)"
    return difference.where("checkpoint")


def _parameter_name(state: dict[str, Any], index: int) -> str:
    """The name of the parameter an optimizer state entry belongs to, for a nanoresume GPT's optimizer
    (parameter ids count through the groups, as ``Optimizer.state_dict`` numbers them)."""
    if state.get(KIND_KEY) != KIND:
        return f"parameter {index}"
    from pathlib import Path

    from ..loading import model_config_from_state
    from ..model import GPT
    from ..optim import build_optimizer

    with torch.device("meta"):
        model = GPT(model_config_from_state(Path("checkpoint"), state))
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in build_optimizer(model, 1.0, 0.0, (0.9, 0.99)).param_groups
               for p in group["params"]]
    return ordered[index] if isinstance(index, int) and 0 <= index < len(ordered) else f"parameter {index}"


def where_it_began(finding: Finding) -> str:
    """When, relative to the stops, the run first left the reference: the best clue to the cause."""
    outcome, step = finding.outcome, finding.loss_step
    if step is None and finding.differing == ["RNG streams"]:
        return ("only the random number streams differ: a stream the run never seeded (Python's random, NumPy's) "
                "starts differently in every process; seed them all (nanoresume.seed_everything)")
    if step is None:
        return ("every step's loss matched (or the program records none), but the final state differs: "
                "something that does not feed the loss was not saved or restored exactly")
    if outcome.resumed and step <= outcome.resumed[0]:
        return (f"step {step} comes before the first resume (from step {outcome.resumed[0]}): this run left the "
                f"reference without being stopped, so training itself is not deterministic here")
    if step - 1 in outcome.resumed:
        return (f"step {step} is the first step after resuming from step {step - 1}: something that step uses "
                f"was not restored exactly (random numbers, the data position, optimizer or scheduler state)")
    after = step - max(r for r in outcome.resumed if r < step)
    return (f"step {step} comes {after} steps after a resume: "
            f"something restored only matters later (a schedule, an evaluation), or training is not "
            f"deterministic here")


# ---- what a self-test says before and while it runs ----------------------------------------------

def describe_training(cfg: TrainConfig, processes: Optional[int]) -> str:
    from ..runtime import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    where = f"{processes} processes under torchrun" if processes else "one process"
    saves = "background" if cfg.async_save else "synchronous"
    every = "step" if cfg.effective_ckpt_interval == 1 else f"{cfg.effective_ckpt_interval} steps"
    return (f"--preset {cfg.preset}, {cfg.max_steps} steps on {device.type} ({dtype}), {where}, "
            f"{saves} checkpoints every {every}")


def estimate_rest(reference: Outcome, steps: int, scenarios: Sequence[Scenario]) -> float:
    """Seconds the other scenarios should take, from the reference's start-up time and step time."""
    startup, per_step = reference.seconds / 2, reference.seconds / (2 * max(steps, 1))
    times = _step_times(reference)
    if len(times) >= 2:
        per_step = (times[-1] - times[0]) / (len(times) - 1)
        startup = max(0.0, reference.seconds - steps * per_step)
    starts = sum(len(s.stops) + 1 for s in scenarios)
    kills = sum(1 for s in scenarios for stop in s.stops if not stop.graceful)
    return starts * startup + (len(scenarios) + 0.2 * kills) * steps * per_step


def _step_times(outcome: Outcome) -> list[float]:
    import json

    path = RunDir(outcome.out).metrics
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["time"] for r in records if "train/loss" in r and "time" in r]


# ---- common causes -------------------------------------------------------------------------------

OMP_HINT = ("a different thread count between the first start and a resume (OMP_NUM_THREADS, or the CPUs a "
            "job gets) changes how sums are split up: keep it fixed (here: {})")
TF32_HINT = ("TF32 matmuls (torch.backends.cuda.matmul.allow_tf32, torch.set_float32_matmul_precision, "
             "NVIDIA_TF32_OVERRIDE): keep the same setting on every start")


def training_hints(cfg: TrainConfig) -> list[str]:
    """The common causes worth naming for this configuration, most likely first."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    hints = []
    if cuda and not cfg.deterministic:
        hints.append("--no-deterministic lets the GPU choose non-deterministic kernels: drop it")
    if cfg.compile:
        hints.append("--compile: a compiled model may choose other kernels after a restart; try without it")
    if cuda:
        hints.append(TF32_HINT)
    if cuda and cfg.dropout > 0:
        hints.append(f"dropout {cfg.dropout:g} on CUDA draws from each GPU's generator, which is restored only "
                     f"on the same number of GPUs (a resume on another warns about it)")
    hints.append(OMP_HINT.format(_threads()))
    hints.append("a change of your own to the model, data or loop: every random draw must come from a stream "
                 "that is saved and restored, and the data order must follow from the step")
    return hints


def script_hints() -> list[str]:
    return [
        "a DataLoader without generator=: each iter() draws a seed from the global stream right after the resume "
        "restored it; give it a torch.Generator of its own (docs/own-loop.md)",
        "a random draw from a generator the checkpoint does not hold (a torch.Generator of your own, "
        "DataLoader workers, augmentations): draw from the global streams, which Checkpointer saves, or save it",
        "a data order that does not follow from the step (a shuffled iterator restarted from its beginning): "
        "use nanoresume.ResumableSampler, or save the position",
        "state that is not among the objects given to Checkpointer (an EMA, a counter, a scaler)",
        "non-deterministic kernels: torch.use_deterministic_algorithms(True) on a GPU",
        "torch.compile, and " + TF32_HINT,
        OMP_HINT.format(_threads()),
    ]


def _threads() -> str:
    omp = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={omp}" if omp else f"OMP_NUM_THREADS unset, torch uses {torch.get_num_threads()}"
