"""A text sample after each evaluation, for a person watching a run learn (``--sample-tokens``).

Each sample continues ``--sample-prompt`` with tokens drawn from a ``torch.Generator`` of its own,
seeded from ``(--seed, step)``, with dropout off and without gradients
(:func:`~nanoresume.generate.generate_tokens`). So samples never move training's random
streams or its state: a run with samples and one without end bit for bit the same, and a resumed
run prints at step N the sample the uninterrupted one printed there. Nothing about them is
saved in a checkpoint.

Under torchrun every rank generates (under FSDP each new token is a forward that gathers the
weights from all ranks, so all must take part, as in an evaluation); rank 0 prints and logs.
"""

from __future__ import annotations

import time
import unicodedata
from typing import Any, Callable, Optional

import numpy as np
import torch

from .generate import generate_tokens
from .textcodec import codec_for

DEFAULT_PROMPT = "def "  # the default corpus is Python's standard library
TEMPERATURE = 0.8  # nanoresume sample's default: varied text that still shows what was learned
TAG = "sample"  # TensorBoard's Text tab


def sample_seed(seed: int, step: int) -> int:
    """The seed of the sample at ``step``: a function of ``(seed, step)`` only, never of what ran before."""
    high, low = np.random.SeedSequence([seed, step]).generate_state(2, np.uint32)
    return int(high) << 32 | int(low)


def printable(text: str) -> str:
    """``text`` with control characters (an early model's bytes may hold escape sequences that would
    drive the terminal) shown escaped, e.g. ``\\x1b``; newlines and tabs stay."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode()
                   for ch in text)


def console_text(step: int, text: str) -> str:
    """The sample as printed after the evaluation's line: a header, then each line behind a margin."""
    return "\n".join([f"sample at step {step}:", *(f"  | {line}" for line in printable(text).split("\n"))])


def markdown(text: str) -> str:
    """The sample as a Markdown code block (indented), so TensorBoard shows it verbatim."""
    return "\n".join("    " + line for line in printable(text).split("\n"))


class EvalSamples:
    """What to sample at each evaluation, decided once at start-up.

    A vocabulary that is not text (token ids without a tokenizer) turns samples off with one warning.
    """

    def __init__(self, tokens: int, prompt: Optional[str], seed: int, vocab_size: int, device: torch.device,
                 warn: Callable[[str], None]) -> None:
        self.tokens, self.seed, self.device = tokens, seed, device
        codec = codec_for(vocab_size, warn if tokens else None)
        if tokens and codec.kind == "token ids":
            warn(f"no samples at evaluations: this model's {vocab_size:,} tokens are not text (bytes, or GPT-2's "
                 f"with tiktoken installed); --sample-tokens 0 turns them off without this warning")
            self.tokens = 0
        self.codec = codec
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.prompt = codec.encode(prompt) if prompt and self.tokens else []  # [] starts from codec.start_token

    def take(self, model: Any, step: int, autocast: Callable[[], Any],
             cancelled: Optional[Callable[[], bool]] = None) -> Optional[str]:
        """The sample at ``step`` as text (the prompt included); None when samples are off or ``cancelled()``
        turned true on the way."""
        if not self.tokens:
            return None
        with autocast():
            tokens = generate_tokens(model, self.prompt or [self.codec.start_token], self.tokens, TEMPERATURE,
                                     None, sample_seed(self.seed, step), self.device, cancelled)
        if tokens is None:
            return None
        return self.codec.decode(tokens if self.prompt else tokens[1:])  # a start token is not shown

    def show(self, step: int, model: Any, autocast: Callable[[], Any], log: Callable[[str], None],
             metrics: Any, cancelled: Optional[Callable[[], bool]] = None) -> float:
        """Sample, print it (``log``) and log it to TensorBoard (``metrics.text``); returns the seconds it took.
        Every rank calls this (see the module's note); ``log`` and ``metrics`` are silent off rank 0.
        ``cancelled`` (one process only: ranks must agree) drops the sample, e.g. at a stop request."""
        started = time.perf_counter()
        text = self.take(model, step, autocast, cancelled)
        if text is not None:
            log(console_text(step, text))
            metrics.text(step, TAG, markdown(text))
        return time.perf_counter() - started
