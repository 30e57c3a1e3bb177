"""Generate text from a trained model: ``python scripts/sample.py --ckpt OUT/best.pt --prompt "def "``.

Tokens are bytes, so the model may emit a byte sequence that is not valid UTF-8
(it is cut off mid-character, or simply wrong); decoding replaces such bytes
with U+FFFD instead of failing. A seed fixes the output: sampling draws only
from its own ``torch.Generator``, never from the global RNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .clitools import add_device_flag, make_parser, run_reporting_errors
from .runtime import resolve_device
from .errors import UserError
from .loading import load_model
from .model import GPT

EMPTY_PROMPT_TOKEN = ord("\n")  # an empty prompt starts the model at the beginning of a line


def encode(prompt: str) -> list[int]:
    """The prompt's UTF-8 bytes as tokens; a newline for the empty prompt (the model needs one token)."""
    # surrogateescape gives back the raw bytes of a command-line argument that was not valid UTF-8
    return list(prompt.encode("utf-8", errors="surrogateescape")) or [EMPTY_PROMPT_TOKEN]


def decode(tokens: list[int]) -> str:
    """Bytes to text; invalid or incomplete UTF-8 becomes U+FFFD, never an exception."""
    return bytes(tokens).decode("utf-8", errors="replace")


def generate_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float,
                    top_k: Optional[int], seed: int, device: torch.device) -> list[int]:
    """``prompt`` followed by ``max_new_tokens`` sampled tokens; the same seed gives the same tokens."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return out[0].tolist()


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("sample.py", "Generate text from a checkpoint: OUT/best.pt, an export, "
                                      "or any OUT/checkpoints/step_*.pt.")
    parser.add_argument("--ckpt", required=True, metavar="PATH", default=argparse.SUPPRESS,
                        help="checkpoint to sample from (kind 'weights' or 'train'); required")
    parser.add_argument("--prompt", default="", help="text to continue; the default %(default)r starts from a newline")
    parser.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                        help="bytes to generate after the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="softmax temperature; 0 always picks the most likely byte")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only from the K most likely bytes (default %(default)s: all 256)")
    parser.add_argument("--seed", type=int, default=1337, metavar="S", help="seed; the same seed gives the same text")
    add_device_flag(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """All flag problems in one error."""
    problems = []
    if args.max_new_tokens < 0:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be 0 or more")
    if not args.temperature >= 0:  # also catches nan
        problems.append(f"--temperature {args.temperature} must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        problems.append(f"--top-k {args.top_k} must be at least 1 (or left out for all bytes)")
    if problems:
        raise UserError("; ".join(problems))


def write_text(text: str) -> None:
    """Print text even where stdout cannot encode U+FFFD (e.g. an ASCII locale)."""
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.buffer.write(text.encode(encoding, errors="replace"))
    sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        check_args(args)
        device = resolve_device(args.device)
        model, _ = load_model(Path(args.ckpt), device)
        tokens = generate_tokens(model, encode(args.prompt), args.max_new_tokens, args.temperature,
                                 args.top_k, args.seed, device)
        # An empty prompt was only a starting newline for the model; do not print it.
        write_text(decode(tokens if args.prompt else tokens[1:]))
        return 0

    return run_reporting_errors(body)
