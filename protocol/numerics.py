"""Small numeric checks shared by the codecs' callers and the merge engine."""

from __future__ import annotations

import math

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite; a float sum decides the common case in one pass."""
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True  # NaN and Inf propagate through a sum
    return bool(torch.isfinite(t).all())  # the sum may also overflow on large finite values
