"""RNG capture/restore and seeding, as plain values and tensors.

Everything here loads under ``torch.load(weights_only=True)``: numpy's legacy
state tuple holds an ndarray, which the safe loader refuses, so it is stored as a
tensor plus plain fields.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU, and each CUDA device."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Inverse of :func:`capture_rng_state`; returns warnings for state this machine cannot take."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state["cuda"]
    if not cuda_states:
        return []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(cuda_states):
        return [f"the checkpoint holds RNG state for {len(cuda_states)} CUDA device(s) but this machine has "
                f"{available}; CUDA random numbers (dropout on GPU) will differ from the original run"]
    torch.cuda.set_rng_state_all(cuda_states)
    return []


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random streams (every CUDA device's too). A stream left
    unseeded starts differently in every process, so two runs could never end bit for bit alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_rank_streams(seed: int, rank: int, step: Optional[int] = None) -> None:
    """Give a rank random streams of its own (dropout masks differ between ranks).

    Rank 0 keeps the streams of :func:`seed_everything`, so a single process draws exactly
    what it always drew. With ``step`` (a resume on a different number of processes, whose
    saved streams do not map onto the new ranks) every rank starts new streams derived from
    ``(seed, rank, step)``: reproducible, but not a continuation of the original ones.
    """
    if rank == 0 and step is None:
        return
    key = [seed % 2**63, rank] + ([step] if step is not None else [])
    derived = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    seed_everything(derived % 2**63)
