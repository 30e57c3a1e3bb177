"""Text from a GPT, drawn from a random stream of its own.

Generation never touches the global random streams (sampling draws only from a seeded
``torch.Generator``), runs without gradients and with dropout off, and leaves the model in
the mode it found it in. So a training run that samples along the way (``--sample-tokens``)
ends bit for bit where one that never sampled ends, and ``nanoresume sample`` gives the same
text for the same seed.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .model import GPT


@torch.no_grad()
def generate_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float,
                    top_k: Optional[int], seed: int, device: torch.device,
                    cancelled: Optional[Callable[[], bool]] = None) -> Optional[list[int]]:
    """``prompt`` followed by ``max_new_tokens`` sampled tokens; the same seed gives the same tokens.

    ``cancelled``, asked before each token, ends generation early: None is returned then (a stop
    request waits for one forward, not for the whole text). ``model`` may be a GPT sharded by
    FSDP2: each new token is then one forward with every rank taking part, so every rank must call
    this with the same ``max_new_tokens`` and no ``cancelled``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    was_training = model.training
    model.eval()  # dropout off: it would draw from the global stream
    try:
        if cancelled is None:
            idx = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
        else:
            for _ in range(max_new_tokens):  # token by token: the same draws, in the same order
                if cancelled():
                    return None
                idx = model.generate(idx, 1, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        model.train(was_training)
    return idx[0].tolist()
