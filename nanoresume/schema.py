"""What a checkpoint of each kind holds, keys and types, checked in one place.

Two kinds exist (the keys of a training state are named in :mod:`nanoresume.training_state`):
``"train"`` (``OUT/checkpoints/step_*.pt``, the full training state) and
``"weights"`` (``OUT/best.pt`` or an export). A file without :func:`problems`
can be resumed from (train) or sampled from (either) without a crash, as far as
its keys and types go; :mod:`nanoresume.loading` adds the model tensors' shapes.
Everything that reads a checkpoint goes through there, so ``ckpt.py verify``
means "resume will accept it". The checks never raise: each problem is one line.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import torch

from .config import ARCHITECTURE_FIELDS, MAX_SEED, PRESETS, ModelConfig, TrainConfig
from .training_state import (BEST_VAL_LOSS, CONFIG, DATA, EVALUATED_STEP, FINGERPRINT, FORMAT_VERSION,
                             FORMAT_VERSION_KEY, HEADER, KIND, KIND_KEY, MODEL, OPTIMIZER, RANK, RANKS, RNG, SAMPLER,
                             SCALER, SCHEDULER, STEP, TOKENS_SEEN, WORLD_SIZE)

WEIGHTS_KIND = "weights"
KINDS = (KIND, WEIGHTS_KIND)
# The keys of a weights file that a training state does not have.
VAL_LOSS = "val_loss"
MODEL_CONFIG = "model_config"
# ModelConfig fields a checkpoint must hold; dropout is left out on purpose (inference runs without it).
SHAPE_FIELDS = ARCHITECTURE_FIELDS
# TrainConfig fields that a preset fills: None there (as in a config that was never resolved) cannot train.
_RESOLVED_FIELDS = tuple(PRESETS["cpu"])
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")

# Bounds of the integers a checkpoint holds, so that a crafted value is refused here, in one line, rather
# than overflowing an int64 (torch, numpy) or running backwards once a run resumes from it.
MAX_COUNT = 2**62 - 1  # steps, tokens, positions: far beyond any run, and within an int64
MAX_ID = 2**31 - 1  # sizes of the model, format versions, parameter ids
MAX_WORLD_SIZE = 2**20
_BOUND_NAMES = {MAX_COUNT: "2**62 - 1", MAX_ID: "2**31 - 1", MAX_WORLD_SIZE: "2**20", MAX_SEED: "2**64 - 1"}
# Bounds of the config's int fields where they are not [0, MAX_COUNT].
_CONFIG_BOUNDS = {**{name: (1, MAX_ID) for name in ARCHITECTURE_FIELDS}, "seed": (0, MAX_SEED)}

Check = Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(low: int, high: int) -> Check:
    return lambda value: _is_int(value) and low <= value <= high


def _range_text(low: int, high: int) -> str:
    """``an int in [0, 2**62 - 1]``: a bound as a message names it."""
    return f"an int in [{_BOUND_NAMES.get(low, low)}, {_BOUND_NAMES.get(high, high)}]"


def _bounded(low: int, high: int) -> tuple[str, Check]:
    return _range_text(low, high), _in_range(low, high)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _is_vector(value: Any, length: int) -> bool:
    """A 1-D tensor of ``length`` values: the Mersenne Twister states have fixed sizes (625 and 624)."""
    return _is_tensor(value) and value.shape == (length,)


def _is_optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _check_for(hint: Any) -> Check:
    """A check for one dataclass field's type hint: an int that is not a bool, a float (an int will do),
    a bool, any other class by isinstance, or Optional of one of these."""
    if typing.get_origin(hint) is typing.Union:
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _is_optional(_check_for(inner[0]))
    simple: dict[Any, Check] = {int: _is_int, float: _is_number, bool: lambda v: isinstance(v, bool)}
    if hint in simple:
        return simple[hint]
    base = typing.get_origin(hint) or hint  # list[str] -> list
    return lambda value: isinstance(value, base)


# One check per top-level key of each kind; nested values get their own functions below.
_TOP_LEVEL: dict[str, dict[str, tuple[str, Check]]] = {
    KIND: {
        STEP: _bounded(0, MAX_COUNT),
        TOKENS_SEEN: _bounded(0, MAX_COUNT),
        BEST_VAL_LOSS: ("a number", _is_number),
        EVALUATED_STEP: _bounded(-1, MAX_COUNT),  # -1: no evaluation yet
        CONFIG: ("a dict", lambda v: isinstance(v, dict)),
        DATA: ("a dict", lambda v: isinstance(v, dict)),
        MODEL: ("a dict", lambda v: isinstance(v, dict)),
        OPTIMIZER: ("a dict", lambda v: isinstance(v, dict)),
        SCHEDULER: ("a dict", lambda v: isinstance(v, dict)),
        SCALER: ("a dict", lambda v: isinstance(v, dict)),
        SAMPLER: ("a dict", lambda v: isinstance(v, dict)),
        WORLD_SIZE: _bounded(1, MAX_WORLD_SIZE),
        RANKS: ("a non-empty list", lambda v: isinstance(v, (list, tuple)) and len(v) > 0),
    },
    WEIGHTS_KIND: {
        STEP: _bounded(0, MAX_COUNT),
        TOKENS_SEEN: _bounded(0, MAX_COUNT),
        VAL_LOSS: ("a number or None", _is_optional(_is_number)),
        MODEL: ("a dict", lambda v: isinstance(v, dict)),
        MODEL_CONFIG: ("a dict", lambda v: isinstance(v, dict)),
    },
}
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {kind: (*HEADER, *keys) for kind, keys in _TOP_LEVEL.items()}


def problems(state: Any) -> list[str]:
    """Everything wrong with a loaded checkpoint, one line each (empty: it is usable)."""
    if not isinstance(state, dict):
        return [f"holds a {type(state).__name__}, not a dict"]
    found = _header_problems(state)
    if found:
        return found
    kind = state[KIND_KEY]
    missing = [key for key in REQUIRED_KEYS[kind] if key not in state]
    if missing:
        return [f"{kind} checkpoint lacks {', '.join(missing)}; it was not written by nanoresume or is from "
                f"an incompatible version"]
    for key, (expected, check) in _TOP_LEVEL[kind].items():
        if not check(state[key]):
            found.append(f"{key!r} is {_describe(state[key])}, not {expected}")
    if found:
        return found
    found += _model_problems(state[MODEL])
    if kind == WEIGHTS_KIND:
        return found + _config_problems(MODEL_CONFIG, state[MODEL_CONFIG], ModelConfig, SHAPE_FIELDS)
    return (found + _config_problems(CONFIG, state[CONFIG], TrainConfig, SHAPE_FIELDS + _RESOLVED_FIELDS)
            + _data_problems(state[DATA]) + _optimizer_problems(state[OPTIMIZER])
            + _scheduler_problems(state[SCHEDULER]) + _scaler_problems(state[SCALER])
            + _sampler_problems(state[SAMPLER]) + _ranks_problems(state[RANKS], state[WORLD_SIZE]))


def _header_problems(state: dict[str, Any]) -> list[str]:
    found = []
    version = state.get(FORMAT_VERSION_KEY)
    if not _in_range(0, MAX_ID)(version):
        found.append(f"{FORMAT_VERSION_KEY!r} is {_describe(version)}, not {_range_text(0, MAX_ID)}")
    kind = state.get(KIND_KEY)
    if not isinstance(kind, str):
        found.append(f"{KIND_KEY!r} is {_describe(kind)}, not a str")
    elif kind == "state":
        found.append("written by nanoresume.Checkpointer for a loop of your own, not by the GPT trainer; "
                     "resume it with that loop (nanoresume ckpt verify/show/diff read it too)")
    elif kind not in KINDS:
        found.append(f"unknown checkpoint kind {kind!r}; expected 'train' (a step checkpoint) or 'weights' "
                     f"(best.pt or an export)")
    return found


def _model_problems(model: dict[Any, Any]) -> list[str]:
    if not model:
        return ["'model' holds no tensors"]
    wrong = [str(name) for name, value in model.items() if not (isinstance(name, str) and _is_tensor(value))]
    return [f"'model' is not a dict of named tensors ({', '.join(wrong[:3])})"] if wrong else []


def _config_problems(key: str, config: dict[str, Any], schema: type, required: tuple[str, ...]) -> list[str]:
    """Every field of ``schema`` that is present has its type hint's type, and ``required`` ones are
    present and not None. A field that is absent takes its default (a file from an older version);
    one the dataclass does not know is ignored (a newer version's)."""
    hints = typing.get_type_hints(schema)
    found = []
    for f in dataclasses.fields(schema):
        value = config.get(f.name)
        if f.name in required and value is None:
            found.append(f"{key}.{f.name} is missing")
        elif f.name in config and not _check_for(hints[f.name])(value):
            found.append(f"{key}.{f.name} is {_describe(value)}, not "
                         f"{_hint_name(hints[f.name], allow_none=f.name not in required)}")
        elif _is_int(value) and not _in_range(*_CONFIG_BOUNDS.get(f.name, (0, MAX_COUNT)))(value):
            found.append(f"{key}.{f.name} is {_describe(value)}, not "
                         f"{_range_text(*_CONFIG_BOUNDS.get(f.name, (0, MAX_COUNT)))}")
    return found


def _data_problems(data: dict[str, Any]) -> list[str]:
    return [] if isinstance(data.get(FINGERPRINT), str) else \
        [f"{DATA}.{FINGERPRINT} is {_describe(data.get(FINGERPRINT))}, not the SHA-256 string of the training data"]


def _optimizer_problems(optimizer: dict[str, Any]) -> list[str]:
    found = []
    if not isinstance(optimizer.get("state"), dict):
        found.append(f"optimizer.state is {_describe(optimizer.get('state'))}, not a dict")
    elif not all(isinstance(s, dict) and all(_is_tensor(t) for t in s.values())
                 for s in optimizer["state"].values()):
        found.append("optimizer.state holds something other than dicts of tensors")
    groups = optimizer.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not groups:
        found.append(f"optimizer.param_groups is {_describe(groups)}, not a non-empty list")
    elif not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                 and all(_is_int(p) for p in g["params"]) for g in groups):
        found.append("optimizer.param_groups holds a group without its list of parameter ids")
    elif not all(_in_range(0, MAX_ID)(p) for g in groups for p in g["params"]):
        wrong = next(p for g in groups for p in g["params"] if not _in_range(0, MAX_ID)(p))
        found.append(f"optimizer.param_groups holds the parameter id {wrong!r:.40}, not {_range_text(0, MAX_ID)}")
    return found


def _scheduler_problems(scheduler: dict[str, Any]) -> list[str]:
    epoch = scheduler.get("last_epoch")
    return [] if _in_range(-1, MAX_COUNT)(epoch) else \
        [f"scheduler.last_epoch is {_describe(epoch)}, not {_range_text(-1, MAX_COUNT)}"]


def _scaler_problems(scaler: dict[str, Any]) -> list[str]:
    if not scaler:
        return []  # a float32 or bfloat16 run: no gradient scaler
    wrong = [k for k in _SCALER_KEYS if not _is_number(scaler.get(k))]
    if wrong:
        return [f"scaler lacks numeric {', '.join(wrong)}"]
    return [f"{SCALER}.{key} is {_describe(scaler[key])}, not {_range_text(low, MAX_ID)}"
            for key, low in (("growth_interval", 1), ("_growth_tracker", 0)) if not _in_range(low, MAX_ID)(scaler[key])]


def _sampler_problems(sampler: dict[str, Any]) -> list[str]:
    if not all(_is_int(sampler.get(k)) for k in ("seed", "index")):
        return ["sampler is not a dict of int seed and index"]
    return [f"{SAMPLER}.{key} is {_describe(sampler[key])}, not {_range_text(low, high)}"
            for key, (low, high) in (("seed", (0, MAX_SEED)), ("index", (0, MAX_COUNT)))
            if not _in_range(low, high)(sampler[key])]


def _ranks_problems(ranks: Any, world_size: int) -> list[str]:
    """One entry per process that wrote the checkpoint, in rank order."""
    if len(ranks) != world_size:
        return [f"ranks holds {len(ranks)} entries for a world_size of {world_size}"]
    return [p for i, rank in enumerate(ranks) for p in _rank_problems(i, rank)]


def _rank_problems(index: int, rank: Any) -> list[str]:
    where = f"{RANKS}[{index}]"
    if not isinstance(rank, dict):
        return [f"{where} is {_describe(rank)}, not a dict"]
    found = []
    if rank.get(RANK) != index:
        found.append(f"{where}.{RANK} is {_describe(rank.get(RANK))}, not {index}")
    rng = rank.get(RNG)
    if not isinstance(rng, dict):
        return found + [f"{where}.{RNG} is {_describe(rng)}, not a dict"]
    python, numpy = rng.get("python"), rng.get("numpy")
    if not (isinstance(python, dict) and _is_int(python.get("version")) and _is_vector(python.get("keys"), 625)
            and _is_optional(_is_number)(python.get("gauss"))):
        found.append(f"{where}.rng.python is not python's random state")
    elif not _in_range(0, MAX_ID)(python["version"]):
        found.append(f"{where}.rng.python.version is {_describe(python['version'])}, not {_range_text(0, MAX_ID)}")
    if not (isinstance(numpy, dict) and isinstance(numpy.get("name"), str) and _is_vector(numpy.get("keys"), 624)
            and all(_is_int(numpy.get(k)) for k in ("pos", "has_gauss")) and _is_number(numpy.get("gauss"))):
        found.append(f"{where}.rng.numpy is not numpy's random state")
    else:
        found += [f"{where}.rng.numpy.{key} is {_describe(numpy[key])}, not {_range_text(0, high)}"
                  for key, high in (("pos", 624), ("has_gauss", 1)) if not _in_range(0, high)(numpy[key])]
    torch_state = rng.get("torch")
    if not (_is_tensor(torch_state) and torch_state.dtype == torch.uint8
            and torch_state.shape == torch.get_rng_state().shape):
        found.append(f"{where}.rng.torch is not torch's CPU generator state")
    cuda = rng.get("cuda")
    if not (isinstance(cuda, (list, tuple)) and all(_is_tensor(t) for t in cuda)):
        found.append(f"{where}.rng.cuda is not a list of tensors")
    return found


def _describe(value: Any) -> str:
    """``a str ('1')`` or ``a list of 0``: what a wrong value is, short even for big containers."""
    if value is None:
        return "missing (None)"
    name = _with_article(type(value).__name__)
    if isinstance(value, (str, int, float, bool)):
        return f"{name} ({value!r:.40})"
    return f"{name} of {len(value)}" if isinstance(value, (list, tuple, dict)) else name


def _with_article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _hint_name(hint: Any, allow_none: bool) -> str:
    """``an int``, ``a float or None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    name = _with_article((args[0] if args else hint).__name__)
    return f"{name} or None" if args and allow_none else name


def weights_state(model: dict[str, Any], model_config: dict[str, Any], step: int, tokens_seen: int,
                  val_loss: Any) -> dict[str, Any]:
    """A ``"weights"`` checkpoint (``best.pt``, an export): the model and what is needed to rebuild it.

    ``val_loss`` is the validation loss of these weights, or None when it is not known (an
    export of a step checkpoint, which records only the best loss seen so far).
    """
    return {FORMAT_VERSION_KEY: FORMAT_VERSION, KIND_KEY: WEIGHTS_KIND, MODEL: model, MODEL_CONFIG: model_config,
            STEP: step, TOKENS_SEEN: tokens_seen, VAL_LOSS: val_loss}
