"""LoKr: W' = W + scale * kron(w1, w2), applied through its Kronecker factors; either factor may be
low rank (w1a @ w1b, w2a @ w2b) (tensors: w1, w1a, w1b, w2, w2a, w2b, t2)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..routing import Delta, KroneckerDelta
from . import Factors, kernel_size


def scale(alpha: float | None, w1b: torch.Tensor | None, w2b: torch.Tensor | None) -> float:
    """LyCORIS's LoKr scale: alpha over the rank of its low-rank factor (w2's when both are low
    rank), 1 when both factors are full or there is no alpha."""
    rank = w2b.shape[0] if w2b is not None else w1b.shape[0] if w1b is not None else None
    return alpha / rank if alpha is not None and rank else 1.0


def _parts(f: Factors) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(out1, in1), (out2, in2 [times the kernel when w2 is low rank]) of a LoKr without a Tucker core."""
    if f.get("t2") is not None:
        return None
    w1, w1a, w1b = f.get("w1"), f.get("w1a"), f.get("w1b")
    w2, w2a, w2b = f.get("w2"), f.get("w2a"), f.get("w2b")
    one = tuple(w1.shape[:2]) if w1 is not None else (w1a.shape[0], w1b.shape[1]) if w1a is not None and w1b is not None else None
    two = tuple(w2.shape[:2]) if w2 is not None else (w2a.shape[0], w2b.shape[1]) if w2a is not None and w2b is not None else None
    return None if one is None or two is None else (one, two)


def factor_shape(f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
    """A conv's low-rank ``w2b`` is written (rank, in2*kh*kw) by LyCORIS: its input is divided by the kernel."""
    parts = _parts(f)
    if parts is None:
        return None
    (o1, i1), (o2, i2) = parts
    kernel = kernel_size(weight_shape)
    if f.get("w2") is None and kernel > 1:
        i2 //= kernel
    return o1 * o2, i1 * i2


def routed_delta(f: Factors, weight_shape: Sequence[int]) -> Delta | None:
    """A low-rank factor is multiplied out first: it is at most the size of its Kronecker half."""
    shape = torch.Size(weight_shape)
    if factor_shape(f, shape) != tuple(shape[:2]):
        return None
    w1 = f.get("w1") if f.get("w1") is not None else f.get("w1a").float() @ f.get("w1b").float()
    w2 = f.get("w2") if f.get("w2") is not None else f.get("w2a").float() @ f.get("w2b").float()
    if w1.dim() != 2:
        return None
    if len(shape) == 4 and w2.dim() == 2:  # LyCORIS writes a conv's w2 as (out2, in2*kh*kw)
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    if w2.dim() != len(shape) or tuple(w2.shape[2:]) != tuple(shape[2:]):
        return None
    dtype = next(t for t in (f.get("w1"), f.get("w1a")) if t is not None).dtype  # the file's
    return KroneckerDelta(w1.to(dtype), w2.to(dtype), f.scale)
