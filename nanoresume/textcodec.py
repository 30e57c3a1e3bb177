"""Token ids to text and back, for whatever vocabulary a model was trained on.

- 256 tokens: bytes. Any text encodes; bytes that are not valid UTF-8 decode to
  U+FFFD instead of failing.
- 50257 or 50304 tokens (GPT-2's, as nanoGPT's data uses it, padded or not): text
  through ``tiktoken`` when it happens to be installed. nanoresume never depends
  on it, and never unpickles nanoGPT's ``meta.pkl`` for a vocabulary.
- Anything else (or GPT-2 ids without tiktoken): the token ids themselves.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import UserError

BYTE_VOCAB_SIZE = 256
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's vocabulary, and nanoGPT's padding of it to a multiple of 64
GPT2_END_OF_TEXT = 50256


def encode_bytes(prompt: str) -> list[int]:
    """The prompt's UTF-8 bytes as tokens."""
    # surrogateescape gives back the raw bytes of a command-line argument that was not valid UTF-8
    return list(prompt.encode("utf-8", errors="surrogateescape"))


def decode_bytes(tokens: list[int]) -> str:
    """Bytes to text; invalid or incomplete UTF-8 becomes U+FFFD, never an exception."""
    return bytes(tokens).decode("utf-8", errors="replace")


class TextCodec:
    """How a model's tokens are shown and how a text prompt becomes tokens."""

    def __init__(self, vocab_size: int, encoding: Optional[Any] = None) -> None:
        self.vocab_size = vocab_size
        self.encoding = encoding  # a tiktoken Encoding, or None
        if vocab_size == BYTE_VOCAB_SIZE:
            self.kind, self.start_token = "bytes", ord("\n")  # an empty prompt starts at the beginning of a line
        elif encoding is not None:
            self.kind, self.start_token = f"tiktoken {encoding.name}", GPT2_END_OF_TEXT
        else:
            self.kind = "token ids"
            self.start_token = GPT2_END_OF_TEXT if vocab_size in GPT2_VOCAB_SIZES else 0

    def encode(self, prompt: str) -> list[int]:
        if self.kind == "bytes":
            return encode_bytes(prompt)
        if self.encoding is not None:
            return self.encoding.encode(prompt, allowed_special="all")
        raise UserError(f"this model's vocabulary is {self.vocab_size:,} token ids, not bytes, and no tokenizer "
                        f"for it is installed (tiktoken decodes GPT-2's); give the prompt as ids with "
                        f"--prompt-ids, e.g. --prompt-ids 15496,11")

    def decode(self, tokens: list[int]) -> str:
        if self.kind == "bytes":
            return decode_bytes(tokens)
        if self.encoding is None:
            return " ".join(str(t) for t in tokens)
        # nanoGPT's padding ids (50257..50303) are not GPT-2 tokens: show them as <|id|>
        known = self.encoding.n_vocab
        pieces, run = [], []
        for token in tokens:
            if token < known:
                run.append(token)
                continue
            pieces += [self.encoding.decode(run), f"<|{token}|>"]
            run = []
        return "".join(pieces + [self.encoding.decode(run)])


def codec_for(vocab_size: int, warn: Any = None) -> TextCodec:
    """The codec for a model with ``vocab_size`` tokens; ``warn(line)`` hears why text fell back to ids."""
    if vocab_size not in GPT2_VOCAB_SIZES:
        return TextCodec(vocab_size)
    try:
        import tiktoken  # optional: used only if it happens to be installed
    except ImportError:
        return TextCodec(vocab_size)
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # e.g. its BPE file needs a download and there is no network
        if warn is not None:
            warn(f"tiktoken could not load GPT-2's encoding ({type(e).__name__}: {e}); printing token ids")
        return TextCodec(vocab_size)
    return TextCodec(vocab_size, encoding)
