"""Where and how tensors run: device and autocast dtype choice, deterministic kernels."""

from __future__ import annotations

import os

import torch

from .errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error.

    Under torchrun each process on a machine takes its own GPU, ``cuda:LOCAL_RANK``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} needs a GPU of its own, but this machine has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32  # bf16 matmuls are very slow on common CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def use_deterministic_kernels() -> None:
    """Make GPU results a function of the inputs alone (CPU kernels already are)."""
    # cuBLAS reads this when it first initializes; harmless if it is already set or on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
