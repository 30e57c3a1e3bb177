"""Bit-for-bit comparison of two nested states: the one meaning of "identical" that
the chaos harness, the tests and ``ckpt diff`` share.

Tensors are equal when dtype, shape and bytes are (stricter than ``torch.equal``,
which calls 0.0 and -0.0 equal and NaN unequal to itself); dicts when their key
sets are and every value is; lists and tuples when their type, length and items
are; anything else when its type and value are (two NaN floats count as equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


def tensors_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bytes_a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    bytes_b = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(bytes_a, bytes_b)


def plain_equal(a: Any, b: Any) -> bool:
    """Same type and value; NaN equals NaN, and 0.0 differs from -0.0, as their bits do."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


@dataclass(frozen=True)
class Difference:
    """Where two states first differ: the keys and indices leading there, both values, and what differs."""

    path: tuple[Any, ...]
    a: Any
    b: Any
    what: str  # "tensors differ", "list vs tuple", "2 items vs 3", ...

    def where(self, root: str = "state") -> str:
        """The path as Python would index it: ``state['optimizer']['state'][0]['exp_avg']``."""
        return root + "".join(f"[{key!r}]" for key in self.path)


def find_difference(a: Any, b: Any, path: tuple[Any, ...] = ()) -> Optional[Difference]:
    """None if ``a`` and ``b`` are identical (see the module docstring), else the first place they differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return Difference(path, a, b, f"{type(a).__name__} vs {type(b).__name__}")
        if a.dtype != b.dtype or a.shape != b.shape:
            return Difference(path, a, b, f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        return None if tensors_identical(a, b) else Difference(path, a, b, "tensors differ")
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return Difference(path, a, b, f"{type(a).__name__} vs {type(b).__name__}")
        only_a, only_b = a.keys() - b.keys(), b.keys() - a.keys()
        if only_a or only_b:
            return Difference(path, a, b, f"keys only in A {sorted(map(str, only_a))}, "
                                          f"only in B {sorted(map(str, only_b))}")
        for key in a:
            found = find_difference(a[key], b[key], (*path, key))
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            return Difference(path, a, b, f"{type(a).__name__} vs {type(b).__name__}")
        if len(a) != len(b):
            return Difference(path, a, b, f"{len(a)} items vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            found = find_difference(x, y, (*path, i))
            if found is not None:
                return found
        return None
    return None if plain_equal(a, b) else Difference(path, a, b, f"{a!r:.80} != {b!r:.80}")


def first_difference(a: Any, b: Any, where: str = "state") -> Optional[str]:
    """None if ``a`` and ``b`` are identical (see the module docstring), else one line naming the
    first place they differ, as a path like ``state['optimizer']['state'][0]['exp_avg']``."""
    found = find_difference(a, b)
    return None if found is None else f"{found.where(where)}: {found.what}"
