"""Generate text from a trained model: ``nanoresume sample --ckpt OUT/best.pt --prompt "def "``.

A byte model (vocabulary 256) prints text; its output may hold a byte sequence that
is not valid UTF-8 (cut off mid-character, or simply wrong), which decoding
replaces with U+FFFD instead of failing. A model trained on other token ids (such
as nanoGPT's GPT-2 data) prints text where ``tiktoken`` is installed, else the
ids themselves (see :mod:`nanoresume.textcodec`). A seed fixes the output:
sampling draws only from its own ``torch.Generator``, never from the global RNG
(:func:`nanoresume.generate.generate_tokens`, which training's samples use too).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .clitools import add_device_flag, add_mirror_option_flag, make_parser, run_reporting_errors
from ..console import log
from ..errors import UserError
from ..generate import generate_tokens
from ..loading import load_model
from ..mirror import local_checkpoint, parse_options
from ..runtime import resolve_device
from ..textcodec import TextCodec, codec_for


def build_parser(prog: str = "sample.py") -> argparse.ArgumentParser:
    parser = make_parser(prog, "Generate text from a checkpoint: OUT/best.pt, an export, "
                               "or any OUT/checkpoints/step_* file or folder.")
    parser.add_argument("--ckpt", required=True, metavar="PATH|URL", default=argparse.SUPPRESS,
                        help="checkpoint to sample from (kind 'weights' or 'train'), or its URL on a --mirror "
                             "(s3://bucket/run/best.pt: downloaded to a cache and verified); required")
    add_mirror_option_flag(parser)
    parser.add_argument("--prompt", default="", help="text to continue; the default %(default)r starts from a newline "
                                                     "(or GPT-2's <|endoftext|>)")
    parser.add_argument("--prompt-ids", default=None, metavar="IDS",
                        help="the prompt as token ids, e.g. 15496,11, for a model whose vocabulary is not bytes "
                             "and no tokenizer is installed")
    parser.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                        help="tokens (bytes, for a byte model) to generate after the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="softmax temperature; 0 always picks the most likely token")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only from the K most likely tokens (default %(default)s: all of them)")
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
        problems.append(f"--top-k {args.top_k} must be at least 1 (or left out for all tokens)")
    if args.prompt and args.prompt_ids is not None:
        problems.append("give --prompt or --prompt-ids, not both")
    if problems:
        raise UserError("; ".join(problems))


def prompt_tokens(args: argparse.Namespace, codec: TextCodec) -> Optional[list[int]]:
    """The prompt as tokens; None for an empty prompt (the model then starts from ``codec.start_token``)."""
    if args.prompt_ids is not None:
        try:
            ids = [int(part) for part in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r}: give whole numbers separated by commas") from None
        bad = [i for i in ids if not 0 <= i < codec.vocab_size]
        if bad:
            raise UserError(f"--prompt-ids: {bad[0]} is not a token id of this model (0..{codec.vocab_size - 1})")
        return ids or None
    return codec.encode(args.prompt) if args.prompt else None


def write_text(text: str) -> None:
    """Print text even where stdout cannot encode U+FFFD (e.g. an ASCII locale)."""
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.buffer.write(text.encode(encoding, errors="replace"))
    sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None, prog: str = "sample.py") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        check_args(args)
        device = resolve_device(args.device)
        model, _ = load_model(local_checkpoint(args.ckpt, parse_options(args.mirror_option or [])), device)
        codec = codec_for(model.config.vocab_size, log.warning)
        prompt = prompt_tokens(args, codec)
        tokens = generate_tokens(model, prompt or [codec.start_token], args.max_new_tokens, args.temperature,
                                 args.top_k, args.seed, device)
        # An empty prompt was only a starting token for the model; do not print it.
        write_text(codec.decode(tokens if prompt else tokens[1:]))
        return 0

    return run_reporting_errors(body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m nanoresume.tools.sampling"))
