"""Loss and perplexity of a checkpoint on a whole file, in order (no random batches).

The file is text (bytes, for a byte model) or a token file read as training reads
one. Every token after the first is predicted exactly once: consecutive full windows
(:func:`nanoresume.data.iterate_in_order`), then one shorter window for the
tail those leave over. Batches and windows differ in size, so the mean is
weighted by tokens: ``sum(loss per token) / tokens``, accumulated in float64.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .clitools import add_device_flag, add_mirror_option_flag, make_parser, run_reporting_errors
from ..config import TOKEN_DTYPES, VOCAB_SIZE
from ..console import wants_bar
from ..data import iterate_in_order, read_token_file
from ..runtime import resolve_device
from ..errors import DataError, UserError
from ..loading import load_model
from ..mirror import local_checkpoint, parse_options
from ..model import GPT
from ..training_state import STEP


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, in nats
    tokens: int  # tokens predicted

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 above ~709

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


def in_order_batches(tokens: np.ndarray, block_size: int,
                     batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full windows in order, then the leftover tail as one shorter window, so no token is skipped."""
    yield from iterate_in_order(tokens, block_size, batch_size)
    covered = ((len(tokens) - 1) // block_size) * block_size  # targets predicted by the full windows
    if len(tokens) - 1 > covered:
        chunk = torch.from_numpy(tokens[covered:].astype(np.int64))[None, :]  # (1, tail + 1)
        yield chunk[:, :-1], chunk[:, 1:]


def count_batches(n_tokens: int, block_size: int, batch_size: int) -> int:
    full = (n_tokens - 1) // block_size
    return math.ceil(full / batch_size) + (1 if n_tokens - 1 > full * block_size else 0)


@torch.no_grad()
def mean_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> EvalResult:
    """Token-weighted mean cross-entropy over ``batches`` of (inputs, targets), each (B, T)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            logits, _ = model(x.to(device))
            loss_sum = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).reshape(-1),
                                       reduction="sum")
            total += loss_sum.double().item()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("nothing to evaluate: the text needs at least 2 bytes")
    return EvalResult(loss=total / count, tokens=count)


def evaluate_tokens(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
                    progress: bool = False) -> EvalResult:
    """Loss of ``model`` on every token of ``tokens`` (uint8 or uint16 ids), in order."""
    block_size = model.config.block_size
    batches = in_order_batches(tokens, block_size, batch_size)
    bar = tqdm(batches, total=count_batches(len(tokens), block_size, batch_size), disable=not progress,
               unit="batch", file=sys.stderr, dynamic_ncols=True)
    try:
        return mean_loss(model, bar, device)
    finally:
        bar.close()


def read_text_bytes(path: Path) -> np.ndarray:
    """A file's raw bytes as uint8 tokens (the model's vocabulary is bytes, so any file works)."""
    if not path.is_file():
        raise DataError(f"--data {path}: no such file; point --data at a text file")
    tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if len(tokens) < 2:
        raise DataError(f"--data {path}: holds {len(tokens)} byte(s); it needs at least 2 to predict one")
    return tokens


def read_eval_tokens(path: Path, token_dtype: Optional[str], vocab_size: int) -> np.ndarray:
    """The tokens to score: a ``.bin``/``.npy`` token file as training reads one, or a text
    file's bytes (only for a byte model: other vocabularies need their own tokenizer's ids)."""
    if path.suffix in (".bin", ".npy") and path.is_file():
        tokens, _ = read_token_file(path, token_dtype, vocab_size)
        if len(tokens) < 2:
            raise DataError(f"--data {path}: holds {len(tokens)} token(s); it needs at least 2 to predict one")
        return tokens
    if vocab_size != VOCAB_SIZE:
        raise DataError(f"--data {path}: text is read as bytes, but this model's vocabulary has {vocab_size:,} "
                        f"tokens; evaluate a token file made with its tokenizer (.bin with --token-dtype, or .npy)")
    return read_text_bytes(path)


def build_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    parser = make_parser(prog, "Validation loss and perplexity of a checkpoint on a whole file, "
                               "every token predicted once, in order.")
    parser.add_argument("--ckpt", required=True, metavar="PATH|URL", default=argparse.SUPPRESS,
                        help="checkpoint to evaluate (OUT/best.pt, an export, or a step checkpoint), or its URL on a "
                             "--mirror (downloaded to a cache and verified); required")
    add_mirror_option_flag(parser)
    parser.add_argument("--data", required=True, metavar="FILE", default=argparse.SUPPRESS,
                        help="file to evaluate on: text, read as raw bytes, or a .bin/.npy token file; required")
    parser.add_argument("--token-dtype", choices=TOKEN_DTYPES, default=None,
                        help="how a .bin file stores its tokens (as for training); required for .bin")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="windows of block_size tokens per forward pass (memory, not the result)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")
    add_device_flag(parser)
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "evaluate.py") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size} must be at least 1")
        if not Path(args.data).is_file():
            raise DataError(f"--data {args.data}: no such file; point --data at a text or token file")
        device = resolve_device(args.device)
        model, state = load_model(local_checkpoint(args.ckpt, parse_options(args.mirror_option or [])), device)
        vocab_size = model.config.vocab_size
        tokens = read_eval_tokens(Path(args.data), args.token_dtype, vocab_size)
        result = evaluate_tokens(model, tokens, args.batch_size, device, progress=wants_bar(args.progress))
        unit = "bits/byte" if vocab_size == VOCAB_SIZE else "bits/token"
        print(f"{args.ckpt} (step {state[STEP]:,}) on {args.data}: {result.tokens:,} tokens | "
              f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | {result.bits_per_token:.3f} {unit}")
        return 0

    return run_reporting_errors(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m nanoresume.tools.evaluation"))
