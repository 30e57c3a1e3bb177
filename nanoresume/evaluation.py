"""Loss and perplexity of a checkpoint on a whole text file, in order (no random batches).

Every byte after the first is predicted exactly once: consecutive full windows
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

from .clitools import add_device_flag, make_parser, run_reporting_errors
from .runtime import resolve_device
from .data import iterate_in_order
from .errors import DataError, UserError
from .loading import load_model
from .model import GPT


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, in nats
    tokens: int  # tokens predicted

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 above ~709

    @property
    def bits_per_byte(self) -> float:
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
    """Loss of ``model`` on every token of ``tokens`` (uint8 bytes), in order."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("evaluate.py", "Validation loss and perplexity of a checkpoint on a whole file, "
                                        "every byte predicted once, in order.")
    parser.add_argument("--ckpt", required=True, metavar="PATH", default=argparse.SUPPRESS,
                        help="checkpoint to evaluate (OUT/best.pt, an export, or a step checkpoint); required")
    parser.add_argument("--data", required=True, metavar="FILE", default=argparse.SUPPRESS,
                        help="text file to evaluate on, read as raw bytes; required")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="windows of block_size bytes per forward pass (memory, not the result)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on stderr")
    add_device_flag(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size} must be at least 1")
        tokens = read_text_bytes(Path(args.data))
        device = resolve_device(args.device)
        model, state = load_model(Path(args.ckpt), device)
        result = evaluate_tokens(model, tokens, args.batch_size, device, progress=args.progress)
        print(f"{args.ckpt} (step {state['step']:,}) on {args.data}: {result.tokens:,} tokens | "
              f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | {result.bits_per_byte:.3f} bits/byte")
        return 0

    return run_reporting_errors(body)
