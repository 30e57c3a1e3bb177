"""Where and how tensors run: device and autocast dtype choice, deterministic kernels."""

from __future__ import annotations

import os

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
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
