"""Typed run configuration, the CLI built from it, and its one validation.

Every flag is a field of :class:`TrainConfig`; ``--help`` text lives next to the
field. Model and batch fields default to ``None`` and are filled from the chosen
``--preset``, so ``--preset gpu10m --n-layer 8`` means "the GPU preset, but 8 layers".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from . import __version__
from .configfile import load_settings
from .errors import ConfigError

VOCAB_SIZE = 256  # byte-level tokens: every UTF-8 text works, no tokenizer to download
MAX_LR = 1.0
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts
TOKEN_DTYPES = ("uint8", "uint16")  # how a .bin file stores its tokens (nanoGPT's prepare.py: uint16)
PARALLEL_MODES = ("ddp", "fsdp")
CKPT_FORMATS = ("auto", "file", "sharded")
# Bounds of every number a run takes. The int bounds match the checkpoint schema's (schema.MAX_COUNT for
# counters, schema.MAX_ID for sizes), so a config that validates is one a checkpoint may hold.
MAX_COUNT = 2**62 - 1  # steps and intervals
MAX_SIZE = 2**31 - 1  # model and batch sizes
# Sequences per optimizer step and process (--batch-size x --grad-accum): the sampler draws an index array
# of them each step, 8 bytes a sequence, before the memory check's model-sized numbers could refuse it.
MAX_SEQUENCES_PER_STEP = 2**24
MAX_SECONDS = 1e9  # durations (about 31 years): well below what sleeps and thread joins accept
MAX_SELF_TEST_PROCESSES = 1024  # the self-test's torchrun is --standalone: one machine
SELF_TEST_STEPS = 30  # --max-steps of a --self-test unless given: about a minute for the cpu preset on 2 cores
# Options of the train command that are not config fields.
COMMAND_OPTIONS = ("config", "self_test", "self_test_nproc")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# Model and batch sizes for each preset. "cpu" trains the default corpus on a
# 2-core laptop in about 10 minutes; "gpu10m" is nanoGPT's character-level
# Shakespeare model (about 10M parameters), used by the benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=64, block_size=128, batch_size=12, dropout=0.1, lr=2e-3),
    "gpu10m": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, lr=1e-3),
}

# Fields that define the model's shape (dropout does not: inference runs without it).
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
# Fields that decide which tokens are trained on and which are held out.
DATA_SPLIT_FIELDS = ("val_fraction",)
# A resumed run must match the checkpoint on these; everything else may change across a resume.
MUST_MATCH_ON_RESUME = ARCHITECTURE_FIELDS + DATA_SPLIT_FIELDS
# Fields always taken from the current command line, never from a resumed checkpoint. The
# numerics (dtype, deterministic kernels, compile) are not among them: a resumed run keeps
# the checkpoint's unless a flag says otherwise, so it stays bit-exact by default.
RUNTIME_FIELDS = ("out_dir", "resume", "cache_dir", "device", "time_limit", "progress", "async_save", "mirror",
                  "mirror_option", "mirror_wait", "mirror_keep_last")
# How long a stop waits for the final checkpoint's upload. Spot and preemptible VMs on GCP and Azure,
# and Kubernetes pods (terminationGracePeriodSeconds), get about 30 s between the stop signal and the
# kill (AWS spot: 2 min); the local save and the exit must fit in those 30 s too, so 20 s is left for
# the upload. A longer grace period (SLURM's --signal, AWS) can afford a longer --mirror-wait.
MIRROR_WAIT_SECONDS = 20.0
PROGRESS_HELP = ("progress bar on stderr (default: only when stderr is a terminal, or in a Jupyter or Colab "
                 "notebook, where it is a widget; without one, a plain line every --log-interval steps)")


@dataclass
class ModelConfig:
    """What is needed to build a :class:`~nanoresume.model.GPT` (and nothing else)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 128
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.0
    bias: bool = True


@dataclass
class TrainConfig:
    """One training run, as resolved from the command line (plain values only)."""

    # data and output
    data: Optional[str] = _opt(None, "training data: a .txt file or a folder of .txt files (read as bytes), a "
                                     ".bin/.npy token file, or a folder holding train.bin and val.bin (nanoGPT's "
                                     "layout; its split is used as given) (default: this Python's "
                                     "standard-library sources)")
    token_dtype: Optional[str] = _opt(None, "how a .bin file stores its tokens: uint8 (one byte each) or uint16 "
                                            "(nanoGPT's prepare.py); required for .bin data",
                                      choices=TOKEN_DTYPES)
    out_dir: str = _opt("out", "folder for everything the run writes: checkpoints/, best.pt, tb/, config.json")
    cache_dir: Optional[str] = _opt(None, "where tokenized data is cached "
                                          "(default: $XDG_CACHE_HOME/nanoresume or ~/.cache/nanoresume)")
    val_fraction: float = _opt(0.1, "fraction of the tokens (taken from the end) held out for validation")
    # model
    preset: str = _opt("cpu", "model and batch sizes to start from", choices=tuple(PRESETS))
    n_layer: Optional[int] = _opt(None, "transformer blocks (default: from --preset)")
    n_head: Optional[int] = _opt(None, "attention heads per block (default: from --preset)")
    n_embd: Optional[int] = _opt(None, "embedding width; divisible by --n-head (default: from --preset)")
    block_size: Optional[int] = _opt(None, "context length in tokens (default: from --preset)")
    dropout: Optional[float] = _opt(None, "dropout probability in [0, 1) (default: from --preset)")
    bias: bool = _opt(True, "use bias terms in Linear and LayerNorm layers")
    vocab_size: Optional[int] = _opt(None, "tokens in the model's vocabulary; every token id in the data must be "
                                           "below it (default: 256, bytes; required with --token-dtype uint16, "
                                           "e.g. 50304 for nanoGPT's GPT-2 data)")
    # optimisation
    batch_size: Optional[int] = _opt(None, "sequences per micro-batch (default: from --preset)")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _opt(5000, "optimizer steps to train for")
    lr: Optional[float] = _opt(None, "peak learning rate, at most 1 (default: from --preset)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (end of the cosine)")
    warmup_steps: int = _opt(100, "linear learning-rate warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only; biases, norms stay undecayed)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value (0 disables clipping)")
    # evaluation and checkpoints
    eval_interval: int = _opt(500, "steps between validation evaluations")
    eval_iters: int = _opt(20, "validation batches per evaluation (a fixed set, the same every time)")
    ckpt_interval: Optional[int] = _opt(None, "steps between checkpoints (default: --eval-interval); "
                                              "the last step is always saved")
    ckpt_minutes: Optional[float] = _opt(None, "also save when this many minutes have passed since the last "
                                               "save, off the step interval (bounds what a kill can cost in time)")
    keep_last: int = _opt(3, "step checkpoints to keep; older ones are deleted after a new one is committed")
    async_save: bool = _opt(True, "write checkpoints on a background thread: training waits only for a copy "
                                  "of the state in memory (--no-async-save writes them on the training thread)")
    ckpt_format: str = _opt("auto", "how a step checkpoint is stored: 'file', one file written by rank 0 (under "
                                    "--parallel fsdp gathered to its CPU, so the model must fit there); 'sharded', "
                                    "a folder to which every process writes its own part "
                                    "(torch.distributed.checkpoint); 'auto', sharded under --parallel fsdp, "
                                    "else file", choices=CKPT_FORMATS)
    resume: str = _opt("none", "'auto': newest checkpoint in OUT that verifies (or start fresh if none); "
                               "a path: exactly that checkpoint file or folder; 'none': start fresh, refusing if "
                               "OUT already holds checkpoints")
    # the mirror: a copy of every committed checkpoint on storage that outlives the machine
    mirror: Optional[str] = _opt(None, "also copy each committed checkpoint (and best.pt, config.json, metrics.jsonl, "
                                       "tb/, exit_code) in the background to this folder (a mounted Google Drive, "
                                       "NFS) or fsspec URL (s3://bucket/prefix, gs://bucket/prefix); with --resume "
                                       "auto, a new machine resumes from it when it holds a newer checkpoint than OUT",
                                 metavar="URL")
    mirror_option: Optional[list[str]] = _opt(None, "a storage option for --mirror as KEY=VALUE, repeatable; a dotted "
                                                    "key nests (client_kwargs.endpoint_url=http://host:9000, "
                                                    "profile=NAME). config.json records them: keep secrets in the "
                                                    "environment (AWS_ACCESS_KEY_ID, ...)", repeat=True)
    mirror_wait: float = _opt(MIRROR_WAIT_SECONDS, "at a stop or the end, wait at most this many seconds for the final "
                                                   "checkpoint's upload (fits a 30 s preemption notice with the "
                                                   "local save; never past --time-limit)", metavar="SECONDS")
    mirror_keep_last: Optional[int] = _opt(None, "step checkpoints to keep on the mirror (default: --keep-last); "
                                                 "best.pt and the checkpoint the run resumed from are always kept",
                                           metavar="K")
    # runtime
    device: str = _opt("auto", "where to train; auto picks cuda when available", choices=("auto", "cpu", "cuda"))
    parallel: str = _opt("ddp", "how torchrun's processes share the model: 'ddp', a whole copy of model and "
                                "optimizer on each; 'fsdp', each holds a shard of them (FSDP2), for models whose "
                                "training state does not fit on one device. A single process ignores it",
                         choices=PARALLEL_MODES)
    dtype: str = _opt("auto", "autocast dtype; auto is float32 on CPU, bfloat16 on GPUs that support it, "
                              "else float16 (with a gradient scaler)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _opt(False, "wrap the model in torch.compile (checkpoints hold the plain weights)")
    seed: int = _opt(1337, "seed for weights, dropout and batch order (0 to 2**64-1)")
    deterministic: bool = _opt(True, "use only deterministic GPU kernels, so a resumed run is bit-for-bit "
                                     "the uninterrupted one (no effect on CPU; --no-deterministic trades "
                                     "that for some GPU speed)")
    time_limit: Optional[float] = _opt(None, "stop gracefully (and save) before this wall-clock budget runs "
                                             "out: seconds or HH:MM:SS", parse="duration")
    progress: Optional[bool] = _opt(None, PROGRESS_HELP)
    log_interval: int = _opt(100, "steps between plain progress lines (step, loss, lr, tokens/s, elapsed) "
                                  "when no progress bar is shown")
    # what a person watching sees at each evaluation (never part of the training state)
    sample_tokens: int = _opt(64, "after each evaluation, print this many tokens sampled from the model (and log "
                                  "them to TensorBoard as text); 0 turns samples off. They draw from a random "
                                  "stream of their own: training is bit for bit the same with or without them",
                              metavar="N")
    sample_prompt: Optional[str] = _opt(None, "text the samples continue (default: 'def ', for Python source such "
                                              "as the default corpus; '' starts from a newline)", metavar="TEXT")

    def model_config(self) -> ModelConfig:
        assert self.n_layer is not None, "call resolve_config() first"
        return ModelConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
            vocab_size=self.vocab_size, dropout=self.dropout, bias=self.bias,
        )

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all processes."""
        return self.batch_size * self.grad_accum * world_size

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Training tokens per optimizer step over all processes."""
        return self.global_batch(world_size) * self.block_size

    @property
    def effective_ckpt_interval(self) -> int:
        return self.ckpt_interval if self.ckpt_interval is not None else self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"1.5"`` or ``"HH:MM:SS"`` / ``"MM:SS"``."""
    parts = text.strip().split(":")
    try:
        if len(parts) > 3:
            raise ValueError
        numbers = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not seconds or HH:MM:SS") from None
    if any(n < 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give a positive number of seconds or HH:MM:SS")
    if any(n >= 60 for n in numbers[1:]):
        raise argparse.ArgumentTypeError(f"{text!r}: minutes and seconds must be 0-59 in HH:MM:SS")
    seconds = 0.0
    for number in numbers:
        seconds = seconds * 60 + number
    return seconds


def resolve_config(cfg: TrainConfig, check: bool = True) -> TrainConfig:
    """Fill preset defaults and validate; raises :class:`ConfigError` naming every bad flag.

    ``check=False`` leaves validation to the trainer, for a resume, where the flags
    given only make sense merged with the checkpoint's config.
    """
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"--preset {cfg.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    filled = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})
    if filled.vocab_size is None and filled.token_dtype != "uint16":
        filled = dataclasses.replace(filled, vocab_size=VOCAB_SIZE)
    problems = validate(filled) if check else []
    if problems:
        raise ConfigError("; ".join(problems))
    return filled


# The range of every numeric field (an optional field left unset, None, is not checked). Ints are
# (lowest, highest); floats must also be finite.
INT_RANGES: dict[str, tuple[int, int]] = {
    **{name: (1, MAX_SIZE) for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                                        "grad_accum", "eval_iters")},
    **{name: (1, MAX_COUNT) for name in ("max_steps", "eval_interval", "ckpt_interval", "keep_last",
                                         "mirror_keep_last", "log_interval")},
    "warmup_steps": (0, MAX_COUNT),
    "sample_tokens": (0, MAX_SIZE),  # 0: no samples
    "seed": (0, MAX_SEED),
}
FLOAT_RANGES: dict[str, tuple[str, float, float, str, str]] = {
    # name: (opening bracket, lowest, highest, closing bracket, what follows the interval)
    "val_fraction": ("(", 0.0, 1.0, ")", ""),
    "dropout": ("[", 0.0, 1.0, ")", ""),
    # AdamW learning rates live far below 1; far above, the update overflows float32 and crashes.
    "lr": ("(", 0.0, MAX_LR, "]", ""),
    "min_lr_ratio": ("[", 0.0, 1.0, "]", ""),
    "weight_decay": ("[", 0.0, math.inf, ")", ""),
    "beta1": ("[", 0.0, 1.0, ")", ""),
    "beta2": ("[", 0.0, 1.0, ")", ""),
    "grad_clip": ("[", 0.0, math.inf, ")", " (0: no clipping)"),
    "ckpt_minutes": ("(", 0.0, MAX_SECONDS / 60, "]", " minutes"),
    "time_limit": ("(", 0.0, MAX_SECONDS, "]", " seconds"),
    "mirror_wait": ("[", 0.0, MAX_SECONDS, "]", " seconds"),
}
_BOUND_TEXT = {MAX_COUNT: "2**62 - 1", MAX_SIZE: "2**31 - 1", MAX_SEED: "2**64 - 1"}


def number_problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for the numeric field ``name`` (None: fine, unset, or not numeric).

    One line naming the flag, the value and the allowed range, e.g.
    ``--grad-accum 100000000000000000000 must be at most 2**31 - 1``.
    """
    if value is None:
        return None
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        if name == "seed" and not low <= value <= high:
            return f"--seed {value} must be in [0, 2**64 - 1]"
        if value < low:
            return f"{flag(name)} {value} must be at least {low}"
        if value > high:
            return f"{flag(name)} {value} must be at most {_BOUND_TEXT.get(high, f'{high:,}')}"
    elif name in FLOAT_RANGES:
        opening, low, high, closing, unit = FLOAT_RANGES[name]
        above_low = low <= value if opening == "[" else low < value
        below_high = value <= high if closing == "]" else value < high
        if not (math.isfinite(value) and above_low and below_high):
            return f"{flag(name)} {value!r} must be in {opening}{low:g}, {high:g}{closing}{unit}"
    return None


def validate(cfg: TrainConfig) -> list[str]:
    """All problems with a resolved config, each naming its flag and what would be valid."""
    problems = [problem for name in (*INT_RANGES, *FLOAT_RANGES) if name not in MIRROR_NUMBERS
                if (problem := number_problem(name, getattr(cfg, name))) is not None]

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    if 1 <= cfg.n_head <= MAX_SIZE and 1 <= cfg.n_embd <= MAX_SIZE:
        check(cfg.n_embd % cfg.n_head == 0,
              f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if 1 <= cfg.batch_size <= MAX_SIZE and 1 <= cfg.grad_accum <= MAX_SIZE:
        check(cfg.batch_size * cfg.grad_accum <= MAX_SEQUENCES_PER_STEP,
              f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} must be at most "
              f"{MAX_SEQUENCES_PER_STEP:,} sequences per step and process (2**24)")
    check(cfg.out_dir.strip() != "", "--out-dir must not be empty")
    if cfg.data is not None:  # checked here too, so a typo or an empty file fails before OUT is created
        from .data import data_path_problem  # here, not at the top: it imports torch, and --help stays fast

        problem = data_path_problem(cfg.data)
        check(problem is None, str(problem))
    check(cfg.resume.strip() != "", "--resume must be 'auto', 'none' or a checkpoint path")
    problems += mirror_problems(cfg)
    if cfg.vocab_size is None:
        problems.append("--token-dtype uint16 needs --vocab-size: the vocabulary the data was prepared with "
                        "(50304 for nanoGPT's GPT-2 data; nanoresume does not unpickle meta.pkl)")
    return problems


def mirror_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the --mirror flags (the mirror itself is probed at start-up)."""
    problems = []
    if cfg.mirror is not None and not cfg.mirror.strip():
        problems.append("--mirror must not be empty; give a folder or a URL such as s3://bucket/prefix")
    if cfg.mirror is None and cfg.mirror_option:
        problems.append("--mirror-option only applies to --mirror; add --mirror URL, or leave it out")
    for pair in cfg.mirror_option or []:
        key, sep, _ = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--mirror-option {pair!r} must be KEY=VALUE, e.g. client_kwargs.endpoint_url=http://"
                            f"127.0.0.1:9000")
    return problems + [problem for name in MIRROR_NUMBERS
                       if (problem := number_problem(name, getattr(cfg, name))) is not None]


MIRROR_NUMBERS = ("mirror_wait", "mirror_keep_last")  # checked by mirror_problems, part of validate


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``n_embd`` -> ``--n-embd``."""
    return "--" + name.replace("_", "-")


def command_line_flags(values: dict[str, Any]) -> list[str]:
    """The flags that set ``values`` (config fields), e.g. for a child process:
    ``{"max_steps": 5, "bias": False}`` -> ``["--max-steps", "5", "--no-bias"]``.

    A None value is left out (it is every optional flag's default); floats keep every bit (``repr``).
    """
    args = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):  # a repeatable flag
            for item in value:
                args += [flag(name), str(item)]
        else:
            args += [flag(name), str(value)]
    return args


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage dump) and exits 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=prog,
        description="Train a small GPT (on bytes, or on nanoGPT's token files); stop it any way you like "
                    "and continue bit-for-bit with --resume auto.",
    )
    parser.add_argument("--version", action="version", version=f"nanoresume {__version__}")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from a JSON file (such as a run's OUT/config.json) or a TOML file, "
                             "named like the flags (max_steps = 5000); flags given here override it")
    parser.add_argument("--self-test", action="store_true",
                        help="instead of training: prove that this configuration resumes bit-exactly on this "
                             "machine. Trains it for a few steps (--max-steps %d unless given) in a temporary "
                             "folder, straight through, stopped by SIGTERM, killed during a save and stopped three "
                             "times, then compares every run bit for bit; exit 0 bit-exact, 1 not" % SELF_TEST_STEPS)
    parser.add_argument("--self-test-nproc", type=int, metavar="N", default=None,
                        help="with --self-test: start every run under torchrun with N processes")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        base = _base_type(hints[f.name])
        shown_default = "" if f.default is None else " (default: %(default)s)"
        kwargs: dict[str, Any] = {"help": f.metadata["help"] + shown_default, "default": f.default, "dest": f.name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("repeat"):
            kwargs.update(action="append", type=str, metavar="KEY=VALUE")
        else:
            kwargs["type"] = parse_duration if f.metadata.get("parse") == "duration" else base
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
        parser.add_argument(flag(f.name), **kwargs)
    return parser


def _base_type(kind: Any) -> Any:
    """``Optional[int]`` -> ``int``."""
    return typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind


@dataclass(frozen=True)
class CommandLine:
    """A ``train`` command line, parsed once: the config, the fields the user set (in a ``--config``
    file or as flags; a preset counts as setting every field it fills), and the self-test request
    (None: train; else the processes each run starts under torchrun, 0 for none)."""

    cfg: TrainConfig
    explicit: set[str]
    self_test: Optional[int]


def read_command_line(argv: Optional[list[str]] = None, prog: str = "train.py") -> CommandLine:
    """Parse ``argv`` (a ``--config`` file underneath, flags on top) into a :class:`CommandLine`.

    Exits 2 on unknown flags; raises ConfigError on bad values, then on a bad self-test request.
    """
    argv = sys.argv[1:] if argv is None else argv
    typed = vars(_typed_only(build_parser(prog)).parse_args(argv))  # only what argv sets
    from_file = fields_from_file(typed["config"]) if typed.get("config") is not None else {}
    given = {name: value for name, value in typed.items() if name not in COMMAND_OPTIONS}
    cfg, explicit = _resolve_given(from_file, given)
    return CommandLine(cfg, explicit, _self_test(typed.get("self_test", False), typed.get("self_test_nproc")))


def _resolve_given(*layers: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """The resolved config of the defaults overridden by ``layers`` in order (a --config file, then flags),
    and the fields they set (a preset counts as setting every field it fills)."""
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    explicit: set[str] = set()
    for layer in layers:
        values |= layer
        explicit |= set(layer)
    cfg = resolve_config(TrainConfig(**values), check=values["resume"] == "none")
    for layer in layers:
        if layer.get("preset") is not None:
            explicit |= set(PRESETS[layer["preset"]])
    return cfg, explicit


def config_from_settings(settings: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """The config of Python keyword settings named like the flags (``max_steps=200``), checked as a
    ``--config`` file's are and validated as flags are, and the fields they set. Raises one
    :class:`ConfigError` naming every bad setting (as ``max_steps``, not ``--max-steps``)."""
    values, problems = checked_fields(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        return _resolve_given(values)
    except ConfigError as e:
        raise ConfigError(as_setting_names(str(e))) from None


def as_setting_names(text: str) -> str:
    """``"--n-embd 30 must be ..."`` -> ``"n_embd 30 must be ..."``, for every flag that is a config field."""
    for f in dataclasses.fields(TrainConfig):
        text = re.sub(re.escape(flag(f.name)) + r"(?![\w-])", f.name, text)
    return text


def _typed_only(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``, leaving out of its result every option argv does not set (--help still shows defaults)."""
    for action in parser._actions:
        if action.help and action.default is not argparse.SUPPRESS:
            action.help = action.help.replace("%(default)s", str(action.default).replace("%", "%%"))
        action.default = argparse.SUPPRESS
    return parser


def _self_test(requested: bool, nproc: Optional[int]) -> Optional[int]:
    if nproc is not None and not requested:
        raise ConfigError("--self-test-nproc only applies to --self-test; add --self-test, or leave it out")
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--self-test-nproc {nproc} must be at least 1")
    if nproc is not None and nproc > MAX_SELF_TEST_PROCESSES:
        raise ConfigError(f"--self-test-nproc {nproc} must be at most {MAX_SELF_TEST_PROCESSES} (the self-test runs "
                          f"on one machine)")
    return (nproc or 0) if requested else None


def parse_command_line(argv: Optional[list[str]] = None, prog: str = "train.py") -> tuple[TrainConfig, set[str]]:
    """The config for ``argv`` and the fields the user set (see :class:`CommandLine`)."""
    line = read_command_line(argv, prog)
    return line.cfg, line.explicit


def self_test_request(argv: list[str], prog: str = "train.py") -> Optional[int]:
    """:attr:`CommandLine.self_test` of ``argv``: None without ``--self-test``, else the processes each
    run starts under torchrun (0: no torchrun). Raises ConfigError for ``--self-test-nproc`` without
    ``--self-test``, or below 1."""
    typed = vars(_typed_only(build_parser(prog)).parse_args(argv))
    return _self_test(typed.get("self_test", False), typed.get("self_test_nproc"))


def parse_config(argv: Optional[list[str]] = None, prog: str = "train.py") -> TrainConfig:
    """Parse and resolve CLI arguments; exits 2 on unknown flags, raises ConfigError on bad values."""
    return read_command_line(argv, prog).cfg


def explicit_fields(argv: list[str], prog: str = "train.py") -> set[str]:
    """Names of the fields the user typed (a preset counts as typing every field it fills)."""
    typed = vars(_typed_only(build_parser(prog)).parse_args(argv))
    given = set(typed) - set(COMMAND_OPTIONS)
    return given | set(PRESETS[typed["preset"]]) if "preset" in typed else given


def fields_from_file(path: str) -> dict[str, Any]:
    """Config fields from a ``--config`` file, each checked against its flag's type and choices.

    Keys are field names (``max_steps``; ``max-steps`` works too). Every problem is named
    in one ConfigError.
    """
    values, problems = checked_fields(load_settings(path))
    if problems:
        raise ConfigError(f"--config {path}: {'; '.join(problems)} (settings are named like the flags, "
                          f"as in a run's OUT/config.json)")
    return values


def checked_fields(settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Config fields from ``settings`` named like the flags (``max_steps``; ``max-steps`` works too),
    each checked against its flag's type and choices, and one problem per bad setting (an unknown
    name suggests the closest known one)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values, problems = {}, []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name in DERIVED_FIELDS:
            continue  # written into config.json for the reader; they follow from the settings
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            problems.append(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        try:
            values[name] = _checked_value(fields[name], hints[name], value)
        except ValueError as e:
            problems.append(f"{name} {e}")
    return values, problems


def _checked_value(f: dataclasses.Field, kind: Any, value: Any) -> Any:
    """``value`` as the field's type; ValueError saying what was expected."""
    if value is None:
        if f.default is None:
            return None
        raise ValueError("cannot be empty (null)")
    base = _base_type(kind)
    if f.metadata.get("repeat"):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"must be a string or a list of strings, not {value!r}")
        return list(values)
    if f.metadata.get("parse") == "duration":
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        base = float
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not base:
        raise ValueError(f"must be {_TYPE_NAMES[base]}, not {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{value!r} must be one of {', '.join(choices)}")
    return value


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict`, ignoring fields this version lacks."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def derived_fields(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """What ``config.json`` adds to the settings, for the reader: the processes and the global batch."""
    return {"world_size": world_size, "global_batch_size": cfg.global_batch(world_size),
            "tokens_per_step": cfg.tokens_per_step(world_size)}


DERIVED_FIELDS = ("world_size", "global_batch_size", "tokens_per_step")


def merge_resumed_config(saved: dict[str, Any], current: TrainConfig, explicit: Optional[set[str]],
                         saved_world_size: int = 1, world_size: int = 1, source: str = "the checkpoint",
                         must_match: Sequence[str] = MUST_MATCH_ON_RESUME) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the saved one (``source``), overridden by flags given now.

    ``explicit`` names the flags the user typed (None: every field counts as given, as in
    library use). Raises :class:`CheckpointError` naming every field of ``must_match``
    (those that define the model or data) that differs; returns the merged config and a
    line per other changed field.

    On a different number of processes the global batch (``batch_size * grad_accum *
    world_size`` sequences per step) is kept by choosing ``--grad-accum``, unless the user
    set the batch flags; it is refused when no whole accumulation keeps it.
    """
    from .errors import CheckpointError

    base = config_from_dict(saved)
    given = {f.name for f in dataclasses.fields(TrainConfig)} if explicit is None else set(explicit)
    merged = dataclasses.replace(base, **{name: getattr(current, name) for name in given | set(RUNTIME_FIELDS)})
    mismatches = [f"{flag(name)} is {getattr(base, name)!r} in {source} but {getattr(merged, name)!r} now"
                  for name in must_match if getattr(base, name) != getattr(merged, name)]
    if mismatches:
        raise CheckpointError("cannot resume: " + "; ".join(mismatches)
                              + f". Pass the values in {source}, or choose another --out-dir for a new run")
    merged = _keep_global_batch(base, merged, given, saved_world_size, world_size)
    changes = [f"{flag(f.name)}: {getattr(base, f.name)!r} -> {getattr(merged, f.name)!r}"
               + (" (no effect: the data order and random numbers continue from the checkpoint)"
                  if f.name == "seed" else "")
               for f in dataclasses.fields(TrainConfig)
               if f.name not in RUNTIME_FIELDS and getattr(base, f.name) != getattr(merged, f.name)]
    if saved_world_size != world_size:
        changes.append(f"processes: {saved_world_size} -> {world_size} (global batch "
                       f"{merged.global_batch(world_size):,} sequences per step)")
    return merged, changes


def _keep_global_batch(base: TrainConfig, merged: TrainConfig, given: set[str], saved_world: int,
                       world: int) -> TrainConfig:
    from .errors import CheckpointError

    wanted = base.global_batch(saved_world)
    if merged.global_batch(world) == wanted or "grad_accum" in given:
        return merged  # unchanged, or the user chose the accumulation: a new global batch is theirs to pick
    per_step = merged.batch_size * world
    if wanted % per_step == 0:
        return dataclasses.replace(merged, grad_accum=wanted // per_step)
    raise CheckpointError(
        f"cannot keep the global batch of {wanted:,} sequences per step ({base.batch_size} x --grad-accum "
        f"{base.grad_accum} x {saved_world} process(es)) on {world} process(es) with --batch-size "
        f"{merged.batch_size}; pass --batch-size B and --grad-accum A with B x A x {world} = {wanted:,}")
