"""LoHa: W' = W + scale * (w1a @ w1b) * (w2a @ w2b), routed as the exact low-rank delta of rank r1*r2
where that is smaller than the weight (tensors: w1a, w1b, w2a, w2b, t1, t2)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..routing import Delta, HadamardDelta
from . import Factors, kernel_size


def factor_shape(f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
    """A conv's low-rank ``w1b`` flattens (in, kh, kw); Tucker cores (t1) do not tell."""
    if f.get("t1") is not None or f.get("w1a") is None:
        return None
    return f.get("w1a").shape[0], f.get("w1b").shape[1:].numel() // kernel_size(weight_shape)


def routed_delta(f: Factors, weight_shape: Sequence[int]) -> Delta | None:
    shape = torch.Size(weight_shape)
    if f.get("t1") is not None or f.get("t2") is not None:
        return None
    w1a, w2a = f.get("w1a"), f.get("w2a")
    rank = w1a.shape[1] * w2a.shape[1]
    if factor_shape(f, shape) == tuple(shape[:2]) and rank * (shape[0] + shape[1:].numel()) < shape.numel():
        return HadamardDelta(w1a, f.get("w1b"), w2a, f.get("w2b"), f.scale, tuple(shape))
    return None
