"""``nanoresume ckpt list|verify|show|diff|export`` (``python -m nanoresume ckpt ...``): inspect what training wrote.

Every checkpoint, a file or a folder of shards, is read with :func:`read_any`
(checksums first, then ``weights_only=True`` and, for a folder, DCP's index through an
allow-list, then the schema), so no command ever runs code from a checkpoint, and ``verify``
passes exactly the checkpoints that training would resume from. Files that
:class:`nanoresume.Checkpointer` wrote for a loop of the user's own are read too
(``list``, ``verify``, ``show``, ``diff``); ``export`` refuses them: they hold no GPT.
Exit codes: 0 ok; 1 ``verify``/``list`` found bad files or ``diff`` found
differences; 2 a user error (missing file, bad flag, wrong kind).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import checkpoint, rundir, schema
from .. import training_state as ts
from ..checkpoint import (CheckpointDir, StepCheckpoint, is_checkpoint_folder, load_checkpoint,
                          resolve_resume)
from ..checkpoint.folders import folder_nbytes
from ..checkpointer import check_state_file, is_state_file
from .clitools import add_mirror_option_flag, make_parser, run_reporting_errors
from ..compare import plain_equal, tensors_identical
from ..config import RUNTIME_FIELDS, config_from_dict
from ..errors import CheckpointError, CheckpointWriteError, NanoresumeError, UserError
from ..loading import check_model_tensors, check_schema, load_valid
from ..mirror.fetch import is_url
from ..rundir import RunDir

# Config fields that describe how a run was started, not what it computed: an
# uninterrupted run and its resumed twin differ here (resume 'none' vs 'auto',
# often out_dir). `diff` ignores them unless --strict.
IGNORED_BY_DIFF = tuple(f"config.{name}" for name in RUNTIME_FIELDS)


# ---- finding files ---------------------------------------------------------------------------

def step_folder(out: Path) -> Path:
    """The folder holding step checkpoints: ``OUT/checkpoints``, or OUT itself if it holds them."""
    if RunDir(out).checkpoints.is_dir():
        return RunDir(out).checkpoints
    if out.is_dir() and CheckpointDir(out).list():
        return out
    if not out.exists():
        raise UserError(f"{out}: no such folder; pass a run's --out-dir")
    raise UserError(f"{out}: holds no checkpoints/ folder and no step checkpoints; pass a run's --out-dir")


def read_any(path: Path, tensors: bool = True) -> dict[str, Any]:
    """A verified checkpoint of any kind nanoresume writes: a GPT training state or weights (file or
    folder, fully checked as training and sampling check them), or a :class:`~nanoresume.Checkpointer`
    file of a loop of the user's own (checked for its shape only: its objects are the user's)."""
    path = Path(path)
    if path.is_file():
        state = load_checkpoint(path)
        if is_state_file(state):
            return check_state_file(path, state)
        check_schema(path, state)
        check_model_tensors(path, state)
        return state
    return load_valid(path, tensors)


def accept_any(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """What ``--resume auto`` would accept in this folder: a training state, or an own loop's state."""
    return state if is_state_file(state) else ts.require_train_state(path, state)


class CachedLoader:
    """Load and fully check each checkpoint once (as training does); remember a CheckpointError so
    listing and resume resolution agree. A folder's model and optimizer tensors are checked by shape
    and digest, not read (as training resolves a resume)."""

    def __init__(self) -> None:
        self.results: dict[Path, Any] = {}

    def __call__(self, path: Path) -> dict[str, Any]:
        if path not in self.results:
            try:
                self.results[path] = read_any(path, tensors=False)
            except CheckpointError as e:
                self.results[path] = e
        result = self.results[path]
        if isinstance(result, CheckpointError):
            raise result
        return result


def problem(path: Path, load: Callable[[Path], dict[str, Any]]) -> Optional[str]:
    """None if the checkpoint verifies (checksums, safe load, schema, model tensors), else the one-line
    reason. A step checkpoint must also be a full training state: --resume auto would skip anything else.
    """
    try:
        state = load(path)
    except CheckpointError as e:
        return str(e)
    if is_step_name(path.name) and state[ts.KIND_KEY] not in (ts.KIND, "state"):
        return (f"{path}: holds {state[ts.KIND_KEY]!r} weights under a step checkpoint's name, not a training "
                f"state; --resume auto skips it. Rename or remove it")
    return None


# ---- list and verify -------------------------------------------------------------------------

# Listing or verifying a run that is still training: its pruning may delete a file in between.
GONE = "removed while this command ran (a run still training here prunes its oldest checkpoints)"


def is_step_name(name: str) -> bool:
    return bool(checkpoint.STEP_PATTERN.match(name) or checkpoint.STEP_FOLDER_PATTERN.match(name))


def size_on_disk(path: Path) -> int:
    return folder_nbytes(path) if path.is_dir() else path.stat().st_size


def human_size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} KB"


def written_at(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")


def format_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"


def cmd_list(out: Path) -> int:
    folder = step_folder(out)
    checkpoints = CheckpointDir(folder)
    load = CachedLoader()
    files = checkpoints.list()
    print(f"step checkpoints in {folder}:")
    print(f"  {'step':>8}  {'tokens seen':>13}  {'best val':>8}  {'size':>8}  {'written':19}  status")
    bad = sum(list_row(f, load) for f in files)
    if not files:
        print("  (none)")
    skipped: list[str] = []
    picked = resolve_resume("auto", checkpoints, skipped.append, load=load, accept=accept_any,
                            advice=RunDir.checkpoint_advice)
    print(f"--resume auto would pick: {picked[0].name if picked else 'nothing (a new run would start)'}")
    best = RunDir(out).best
    if best.is_file():
        reason = problem(best, load)
        if reason is None:
            state = load(best)
            print(f"best.pt: step {state[ts.STEP]:,}, val loss {format_loss(state[schema.VAL_LOSS])}")
        else:
            print(f"best.pt: BAD: {reason}")
            bad += 1
    return 1 if bad else 0


def list_row(step_file: StepCheckpoint, load: CachedLoader) -> bool:
    """Print one row; True if the file is bad."""
    path = step_file.path
    reason = problem(path, load)
    try:
        size, when = human_size(size_on_disk(path)), written_at(path)
    except FileNotFoundError:
        print(f"  {step_file.step:>8}  {'-':>13}  {'-':>8}  {'-':>8}  {'-':19}  gone: {GONE}")
        return False
    if reason is not None:
        print(f"  {step_file.step:>8}  {'-':>13}  {'-':>8}  {size:>8}  {when:19}  BAD: {reason}")
        return True
    state = load(path)
    if is_state_file(state):  # a loop of the user's own counts no tokens and keeps no best loss here
        tokens, best = "-", "-"
    else:
        tokens, best = f"{state[ts.TOKENS_SEEN]:,}", format_loss(state[ts.BEST_VAL_LOSS])
    print(f"  {state[ts.STEP]:>8}  {tokens:>13}  {best:>8}  {size:>8}  {when:19}  ok")
    return False


def files_to_verify(target: Path) -> list[Path]:
    if target.is_file() or is_checkpoint_folder(target):
        return [target]
    if not target.exists():
        raise UserError(f"{target}: no such file or folder; pass a checkpoint file or a run's --out-dir")
    files = [s.path for s in CheckpointDir(step_folder(target)).list()]
    if RunDir(target).best.is_file():
        files.append(RunDir(target).best)
    if not files:
        raise UserError(f"{target}: holds no checkpoint files to verify; pass a run's --out-dir or a file")
    return files


def cmd_verify(target: Path) -> int:
    named = target.is_file() or is_checkpoint_folder(target)  # one checkpoint asked for: it must verify
    files = files_to_verify(target)
    load = CachedLoader()
    bad = gone = 0
    for path in files:
        reason = problem(path, load)
        if reason is None:
            print(f"ok   {path}")
        elif not named and not path.exists():
            print(f"gone {path}: {GONE}")
            gone += 1
        else:
            print(f"BAD  {reason}")
            bad += 1
    checked = len(files) - gone
    print(f"{checked - bad} of {checked} checkpoint(s) verify" + (f"; {gone} {GONE}" if gone else ""))
    return 1 if bad else 0


# ---- list and verify a mirror ----------------------------------------------------------------

def mirror_options(pairs: Optional[list[str]]) -> dict[str, Any]:
    from ..mirror import parse_options

    return parse_options(pairs or [])


def cmd_list_mirror(url: str, options: dict[str, Any]) -> int:
    """``list`` for a mirror's URL: every step checkpoint it holds, each downloaded to the cache and
    verified, which one a ``--resume auto`` with this ``--mirror`` would pick, and best.pt."""
    from ..mirror import Mirror, RemoteCheckpoint, fetch_checkpoint, mirror_candidates

    mirror = Mirror(url, options)
    notes: list[str] = []
    listed = _reading(url, mirror.checkpoints)
    usable = {c.name for c in _reading(url, lambda: mirror_candidates(mirror, notes.append))}
    load = CachedLoader()
    print(f"step checkpoints on {url}:")
    print(f"  {'step':>8}  {'tokens seen':>13}  {'best val':>8}  {'size':>8}  status")
    bad, picked = 0, None
    for candidate in listed:
        size = human_size(candidate.size) if candidate.size is not None else "-"
        if candidate.name not in usable:
            print(f"  {candidate.step:>8}  {'-':>13}  {'-':>8}  {size:>8}  skipped: not covered by LATEST.json")
            continue
        try:
            path = _reading(url, lambda c=candidate: fetch_checkpoint(mirror, c, read_any))
            reason = problem(path, load)
        except CheckpointError as e:
            path, reason = None, str(e)
        if reason is not None:
            print(f"  {candidate.step:>8}  {'-':>13}  {'-':>8}  {size:>8}  BAD: {reason}")
            bad += 1
            continue
        state = load(path)
        tokens, best = ("-", "-") if is_state_file(state) else (f"{state[ts.TOKENS_SEEN]:,}",
                                                                  format_loss(state[ts.BEST_VAL_LOSS]))
        print(f"  {candidate.step:>8}  {tokens:>13}  {best:>8}  {human_size(size_on_disk(path)):>8}  ok")
        picked = candidate
    if not listed:
        print("  (none)")
    for note in notes:
        print(f"note: {note}")
    print(f"--resume auto would pick: {mirror.store.where(picked.name) if picked else 'nothing on the mirror'}")
    found = _reading(url, lambda: mirror.store.info(rundir.BEST))
    if found is not None:
        try:
            best_path = _reading(url, lambda: fetch_checkpoint(
                mirror, RemoteCheckpoint(0, rundir.BEST, "file", int(found["size"])), read_any))
            state = load(best_path)
            print(f"best.pt: step {state[ts.STEP]:,}, val loss {format_loss(state[schema.VAL_LOSS])}")
        except CheckpointError as e:
            print(f"best.pt: BAD: {e}")
            bad += 1
    return 1 if bad else 0


def cmd_verify_mirror(url: str, options: dict[str, Any]) -> int:
    """``verify`` for a URL: one checkpoint (``URL/checkpoints/step_*.pt``, ``URL/best.pt``), or every
    step checkpoint a resume could use and best.pt of a mirror, each downloaded to the cache and verified."""
    from ..mirror import Mirror, RemoteCheckpoint, fetch, fetch_checkpoint, mirror_candidates

    base = url.rstrip("/").rpartition("/")[2]
    if base.endswith(".pt") or is_step_name(base):
        try:
            _reading(url, lambda: fetch(url, options, read_any))
        except CheckpointError as e:
            print(f"BAD  {e}")
            return 1
        print(f"ok   {url}")
        return 0
    mirror = Mirror(url, options)
    notes: list[str] = []
    candidates = list(reversed(_reading(url, lambda: mirror_candidates(mirror, notes.append))))
    found = _reading(url, lambda: mirror.store.info(rundir.BEST))
    if found is not None:
        candidates.append(RemoteCheckpoint(0, rundir.BEST, "file", int(found["size"])))
    for note in notes:
        print(f"note: {note}")
    if not candidates:
        raise UserError(f"{url}: holds no checkpoint a resume could use; `nanoresume ckpt list {url}` says why")
    bad = 0
    for candidate in candidates:
        try:
            path = _reading(url, lambda c=candidate: fetch_checkpoint(mirror, c, read_any))
            reason = problem(path, read_any)
        except CheckpointError as e:
            reason = str(e)
        if reason is None:
            print(f"ok   {mirror.store.where(candidate.name)}")
        else:
            print(f"BAD  {reason}")
            bad += 1
    print(f"{len(candidates) - bad} of {len(candidates)} checkpoint(s) verify")
    return 1 if bad else 0


def _reading(url: str, read: Callable[[], Any]) -> Any:
    """``read()``, with the store's errors (network, credentials, a missing bucket) as one line."""
    from ..mirror import MirrorError, describe_failure

    try:
        return read()
    except (NanoresumeError, CheckpointError):
        raise
    except Exception as e:  # the store's own: OSError, botocore's NoCredentialsError, ...
        raise MirrorError(describe_failure(url, e).replace(f"--mirror {url}", url, 1)) from None


# ---- show ------------------------------------------------------------------------------------

def tensor_line(name: str, t: torch.Tensor) -> str:
    norm = f"norm {t.double().norm().item():.4g}" if t.is_floating_point() else ""
    return f"  {name:<40} {str(tuple(t.shape)):<16} {str(t.dtype).replace('torch.', ''):<9} {norm}"


def optimizer_summary(opt: dict[str, Any]) -> list[str]:
    """Hyperparameters per group, then per kind of state tensor: how many, elements, global norm."""
    lines = []
    for i, group in enumerate(opt.get("param_groups", [])):
        settings = ", ".join(f"{k}={v}" for k, v in group.items() if k in ("lr", "betas", "weight_decay", "eps"))
        lines.append(f"  group {i}: {len(group.get('params', []))} params, {settings}")
    per_kind: dict[str, list[torch.Tensor]] = {}
    for param_state in opt.get("state", {}).values():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                per_kind.setdefault(key, []).append(value)
    for key, tensors in per_kind.items():
        if all(t.numel() == 1 for t in tensors):
            values = sorted({t.item() for t in tensors})
            lines.append(f"  {key}: {len(tensors)} scalars, values {values[:4]}")
        else:
            norm = math.sqrt(sum(t.double().norm().item() ** 2 for t in tensors))
            lines.append(f"  {key}: {len(tensors)} tensors, {sum(t.numel() for t in tensors):,} values, "
                         f"global norm {norm:.4g}")
    return lines


def unique_parameters(model: dict[str, torch.Tensor]) -> int:
    """Values in the model, counting tied (shared-storage) tensors once."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel()
    return sum(seen.values())


def cmd_show(path: Path) -> int:
    state = read_any(path)
    if is_state_file(state):
        return show_state_file(path, state)
    train = state[ts.KIND_KEY] == ts.KIND
    config = state[ts.CONFIG] if train else state[schema.MODEL_CONFIG]
    print(f"{path}: kind {state[ts.KIND_KEY]!r}, format_version {state[ts.FORMAT_VERSION_KEY]}, "
          f"step {state[ts.STEP]:,}, tokens seen {state[ts.TOKENS_SEEN]:,}")
    loss_key = ts.BEST_VAL_LOSS if train else schema.VAL_LOSS
    print(f"{loss_key}: {format_loss(state[loss_key])}")
    print(f"state keys: {', '.join(state)}")
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.is_file())
        print(f"stored as a folder of shards: {', '.join(files)} ({human_size(folder_nbytes(path))})")
    print(f"{ts.CONFIG if train else schema.MODEL_CONFIG}:")
    for key in sorted(config):
        print(f"  {key} = {config[key]!r}")
    if ts.DATA in state:
        data = state[ts.DATA]
        print(f"data: {data.get(ts.SOURCE)} (fingerprint {str(data.get(ts.FINGERPRINT))[:12]})")
    model = state[ts.MODEL]
    print(f"model: {len(model)} tensors, {unique_parameters(model):,} parameters (tied tensors counted once)")
    for name, t in model.items():
        print(tensor_line(name, t))
    if ts.OPTIMIZER in state:
        print("optimizer:")
        print("\n".join(optimizer_summary(state[ts.OPTIMIZER])))
    if ts.SCHEDULER in state:
        print(f"scheduler: last_epoch {state[ts.SCHEDULER].get('last_epoch')}, "
              f"last lr {state[ts.SCHEDULER].get('_last_lr')}")
    if ts.SCALER in state:
        print(f"scaler: {state[ts.SCALER] or 'disabled (float32/bfloat16 run)'}")
    if ts.SAMPLER in state:
        print(f"sampler: {state[ts.SAMPLER]} (written by {state.get(ts.WORLD_SIZE, 1)} process(es))")
    for rank in state.get(ts.RANKS, []):
        print(f"rank {rank.get(ts.RANK)}: rng streams {', '.join(rank.get(ts.RNG, {}))}")
    return 0


def show_state_file(path: Path, state: dict[str, Any]) -> int:
    """``show`` for a Checkpointer file: its step, then every tensor and value of each named object."""
    objects = state["objects"]
    print(f"{path}: kind 'state' (nanoresume.Checkpointer), format_version {state.get('format_version')}, "
          f"step {state['step']:,}")
    print(f"objects: {', '.join(objects) or '(none)'}")
    for name, value in objects.items():
        leaves = flatten(value)
        tensors = {key: t for key, t in leaves.items() if isinstance(t, torch.Tensor)}
        print(f"{name}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values"
              f"{f', {len(leaves) - len(tensors)} other values' if len(leaves) > len(tensors) else ''}")
        for key, leaf in leaves.items():
            print(tensor_line(key, leaf) if isinstance(leaf, torch.Tensor) else f"  {key:<40} {leaf!r:.60}")
    rng = state.get("rng")
    print(f"rng streams: {', '.join(map(str, rng)) if rng else 'not saved (rng=False)'}")
    return 0


# ---- diff ------------------------------------------------------------------------------------

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists/tuples as ``{"a.b.0": leaf}`` (lists and tuples alike: torch.load may
    return either for the same saved value)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not flat:
        flat[prefix] = type(obj)()  # an empty container is a value too
    return flat


def describe_tensor_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    x, y = a.detach().cpu().double(), b.detach().cpu().double()
    differ = int((x != y).sum().item())
    diff = (x - y).abs().nan_to_num(nan=math.inf)
    return f"max abs diff {diff.max().item():.3g} ({differ:,} of {a.numel():,} values differ)"


def diff_states(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...]) -> tuple[list[str], list[str], int]:
    """(differences, ignored differences, leaves compared), one line per differing leaf."""
    flat_a, flat_b = flatten(a), flatten(b)
    lines, ignored = [], []
    for key in sorted(flat_a.keys() | flat_b.keys(), key=natural_key):
        target = ignored if key in ignore else lines
        if key not in flat_b:
            target.append(f"{key}: only in A")
        elif key not in flat_a:
            target.append(f"{key}: only in B")
        else:
            x, y = flat_a[key], flat_b[key]
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if not tensors_identical(x, y):
                    target.append(f"{key}: {describe_tensor_difference(x, y)}")
            elif not plain_equal(x, y):
                target.append(f"{key}: {x!r} vs {y!r}")
    return lines, ignored, len(flat_a.keys() | flat_b.keys())


def natural_key(key: str) -> list[Any]:
    """Sort "blocks.10" after "blocks.2"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def cmd_diff(path_a: Path, path_b: Path, strict: bool) -> int:
    states = []
    for path in (path_a, path_b):
        states.append(read_any(path))
    lines, ignored, compared = diff_states(states[0], states[1], () if strict else IGNORED_BY_DIFF)
    print(f"A = {path_a}\nB = {path_b}")
    for line in lines:
        print(f"  {line}")
    for line in ignored:
        print(f"  (ignored, run-only) {line}")
    if lines:
        print(f"{len(lines)} of {compared} entries differ")
        return 1
    print(f"identical: all {compared} entries equal (tensors bit for bit)"
          + ("" if strict else "; run-only config fields ignored, --strict compares them"))
    return 0


# ---- export ----------------------------------------------------------------------------------

def weights_from(state: dict[str, Any]) -> dict[str, Any]:
    """A ``best.pt``-style weights dict from a checkpoint of either kind.

    A step checkpoint records only the best validation loss seen so far, not the loss of
    these weights, so ``val_loss`` is None unless the source already was a weights file.
    """
    if state[ts.KIND_KEY] == schema.WEIGHTS_KIND:
        model_config, val_loss = state[schema.MODEL_CONFIG], state[schema.VAL_LOSS]
    else:
        model_config, val_loss = dataclasses.asdict(config_from_dict(state[ts.CONFIG]).model_config()), None
    return schema.weights_state(state[ts.MODEL], model_config, state[ts.STEP], state[ts.TOKENS_SEEN], val_loss)


def check_export_target(source: Path, target: Path, force: bool) -> None:
    if not target.parent.is_dir():
        raise UserError(f"--to {target}: folder {target.parent} does not exist; create it first")
    if target.exists() and target.resolve() == source.resolve():
        raise UserError(f"--to {target} is the source checkpoint itself; choose another file name")
    if target.exists() and not force:
        raise UserError(f"--to {target} already exists; pass --force to overwrite it or choose another name")
    if is_step_name(target.name):
        raise UserError(f"--to {target.name}: step_* names are for training checkpoints and would be "
                        f"mistaken for one by --resume auto; choose another name, e.g. weights.pt")


def cmd_export(source: Path, target: Path, force: bool) -> int:
    state = read_any(source)
    if is_state_file(state):
        raise UserError(f"{source}: written by nanoresume.Checkpointer for a loop of your own, so it holds your "
                        f"objects ({', '.join(state['objects']) or 'none'}), not a GPT that sample/evaluate can run; "
                        f"load it with nanoresume.load_checkpoint")
    check_export_target(source, target, force)
    try:
        checkpoint.save_atomically(weights_from(state), target, checksum_file=False)
        digest = checkpoint.write_checksum_file(target)
    except CheckpointWriteError as e:  # its advice speaks of training; give the export's own
        raise UserError(f"--to {target}: {e.problem}; choose a writable folder with free space") from None
    print(f"wrote {target} (step {state[ts.STEP]:,}, sha256 {digest[:12]}) and "
          f"{checkpoint.checksum_path(target).name}")
    return 0


# ---- command line ----------------------------------------------------------------------------

def build_parser(prog: str = "ckpt.py") -> argparse.ArgumentParser:
    parser = make_parser(prog, "Inspect the checkpoints a training run wrote. Files are verified "
                               "(SHA-256) and loaded with weights_only=True: nothing in them can run code.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    sub = command("list", "every step checkpoint in OUT/checkpoints, file or folder (step, tokens, best val loss "
                          "so far, size, time written, verifies?), which one --resume auto would pick, and "
                          "best.pt; exit 1 if any is bad")
    sub.add_argument("out", metavar="OUT|URL", help="the run's --out-dir, or its --mirror URL (s3://bucket/run)")
    add_mirror_option(sub)
    sub = command("verify", "check checksums, safe load and schema of one checkpoint (file or folder), or of "
                            "every step checkpoint and best.pt of a run; exit 0 only if all verify, else 1 with "
                            "a line per bad one")
    sub.add_argument("target", metavar="PATH|OUT|URL",
                     help="a checkpoint file or folder, or a run's --out-dir; or a run's --mirror URL, or a "
                          "checkpoint under it (s3://bucket/run/best.pt), downloaded to a cache and verified")
    add_mirror_option(sub)
    sub = command("show", "config, format version, state keys, model tensor shapes/dtypes/norms, "
                          "and a summary of optimizer, scheduler, scaler and RNG state")
    sub.add_argument("path", type=Path, metavar="PATH", help="a checkpoint file or folder")
    sub = command("diff", "compare two checkpoints: every config field and every tensor of the nested state "
                          "(model, optimizer, RNG, ...) bit for bit, with the max abs diff of those that "
                          f"differ. Ignores the run-only fields {', '.join(IGNORED_BY_DIFF)} unless --strict. "
                          "Exit 0 if identical, 1 if different")
    sub.add_argument("a", type=Path, metavar="A", help="first checkpoint (file or folder)")
    sub.add_argument("b", type=Path, metavar="B", help="second checkpoint (file or folder)")
    sub.add_argument("--strict", action="store_true", default=False, help="also compare the run-only config fields")
    sub = command("export", "write the model of a checkpoint (a file, or a folder of shards written by any "
                            "number of processes) as one weights-only file like best.pt (with its .sha256), for "
                            "sample.py, evaluate.py or sharing")
    sub.add_argument("path", type=Path, metavar="PATH",
                     help="a step checkpoint, file or folder (or a weights file), to export")
    sub.add_argument("--to", type=Path, required=True, metavar="FILE", default=argparse.SUPPRESS,
                     help="file to write; required")
    sub.add_argument("--force", action="store_true", default=False, help="overwrite FILE if it exists")
    return parser


def add_mirror_option(parser: argparse.ArgumentParser) -> None:
    add_mirror_option_flag(parser)


def main(argv: Optional[list[str]] = None, prog: str = "ckpt.py") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[], int]] = {
        "list": lambda: (cmd_list_mirror(args.out, mirror_options(args.mirror_option)) if is_url(args.out)
                         else cmd_list(Path(args.out))),
        "verify": lambda: (cmd_verify_mirror(args.target, mirror_options(args.mirror_option))
                           if is_url(args.target) else cmd_verify(Path(args.target))),
        "show": lambda: cmd_show(args.path),
        "diff": lambda: cmd_diff(args.a, args.b, args.strict),
        "export": lambda: cmd_export(args.path, args.to, args.force),
    }
    return run_reporting_errors(commands[args.command])


if __name__ == "__main__":
    sys.exit(main(prog="python -m nanoresume.tools.ckpt"))
