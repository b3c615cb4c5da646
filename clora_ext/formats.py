"""LoRA formats as neutral factors, and the routed delta each becomes (host-free).

Every host glue reads a LoRA file with its host's own reader, then describes each layer's
adapter as ``Factors``: the format's name, its tensors by the names below, the host's scale
(alpha over rank, as that format defines it) and whether the delta is the factors alone
(``plain``: no DoRA scale, bias or reshape term). ``routed_delta`` turns factors into the
cheapest exact delta the RowRouter applies per row, out of place and from the factors only
(so it also runs inside the functional gradient pass); ``factor_shape`` tells the layer size
the factors make, to refuse a LoRA made for another model family before sampling.

Tensor names per kind (None where the file has none):
- "lora" (kohya LoRA and LoCon, PEFT): up, down, mid;
- "loha": w1a, w1b, w2a, w2b, t1, t2;
- "lokr": w1, w1a, w1b, w2, w2a, w2b, t2.
A format without a factored form here (CP/Tucker cores, DoRA, OFT, BOFT, GLoRA, IA3, full
weights, ...) gets None from ``routed_delta``: the glue builds its dense delta with the host's
own merge, outside any functional transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .routing import Delta, HadamardDelta, KroneckerDelta, LowRankDelta


@dataclass(frozen=True)
class Factors:
    kind: str
    tensors: Mapping[str, torch.Tensor | None]
    scale: float = 1.0
    plain: bool = True

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


def lokr_scale(alpha: float | None, w1b: torch.Tensor | None, w2b: torch.Tensor | None) -> float:
    """LyCORIS's LoKr scale: alpha over the rank of its low-rank factor (w2's when both are low
    rank), 1 when both factors are full or there is no alpha."""
    rank = w2b.shape[0] if w2b is not None else w1b.shape[0] if w1b is not None else None
    return alpha / rank if alpha is not None and rank else 1.0


def _kernel(weight_shape: Sequence[int]) -> int:
    return int(torch.Size(weight_shape[2:]).numel()) if len(weight_shape) > 2 else 1


def _lokr_parts(f: Factors) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(out1, in1), (out2, in2 [times the kernel when w2 is low rank]) of a LoKr without a Tucker core."""
    if f.get("t2") is not None:
        return None
    w1, w1a, w1b = f.get("w1"), f.get("w1a"), f.get("w1b")
    w2, w2a, w2b = f.get("w2"), f.get("w2a"), f.get("w2b")
    one = tuple(w1.shape[:2]) if w1 is not None else (w1a.shape[0], w1b.shape[1]) if w1a is not None and w1b is not None else None
    two = tuple(w2.shape[:2]) if w2 is not None else (w2a.shape[0], w2b.shape[1]) if w2a is not None and w2b is not None else None
    return None if one is None or two is None else (one, two)


def factor_shape(f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
    """(out, in) of the layer the factors are made for, or None where the factors do not tell
    without building the delta. A conv's low-rank ``*_b`` factor flattens (in, kh, kw)."""
    kernel = _kernel(weight_shape)
    if f.kind == "lora" and f.get("up") is not None and f.get("down") is not None:
        return f.get("up").shape[0], f.get("down").shape[1]
    if f.kind == "loha" and f.get("t1") is None and f.get("w1a") is not None:
        return f.get("w1a").shape[0], f.get("w1b").shape[1:].numel() // kernel
    if f.kind == "lokr":
        parts = _lokr_parts(f)
        if parts is None:
            return None
        (o1, i1), (o2, i2) = parts
        if f.get("w2") is None and kernel > 1:
            i2 //= kernel
        return o1 * o2, i1 * i2
    return None


def routed_delta(f: Factors, weight_shape: Sequence[int], grouped: bool = False) -> Delta | None:
    """The cheapest exact routed form of the layer's delta at multiplier 1, or None (build it dense).

    Plain LoRA/LoCon stays low-rank; LoHa becomes an exact low-rank delta of rank r1*r2 where that
    is smaller than the weight; LoKr is applied through its Kronecker factors (a low-rank factor is
    multiplied out first: it is at most the size of its Kronecker half). ``grouped``: a grouped conv,
    which only the dense form fits.
    """
    shape = torch.Size(weight_shape)
    if not f.plain or grouped:
        return None
    if f.kind == "lora" and f.get("mid") is None and f.get("up") is not None:
        up, down = f.get("up"), f.get("down")
        # a conv's kernel is down's (up is 1x1); a Linear takes factors written as 1x1 convs too
        kernel = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
        if (up.shape[0], down.shape[1]) != tuple(shape[:2]) or kernel != (tuple(shape[2:]) or (1, 1)):
            return None
        return LowRankDelta(down=down, up=up, scale=f.scale)
    if f.kind == "loha" and f.get("t1") is None and f.get("t2") is None:
        w1a, w2a = f.get("w1a"), f.get("w2a")
        rank = w1a.shape[1] * w2a.shape[1]
        if factor_shape(f, shape) == tuple(shape[:2]) and rank * (shape[0] + shape[1:].numel()) < shape.numel():
            return HadamardDelta(w1a, f.get("w1b"), w2a, f.get("w2b"), f.scale, tuple(shape))
        return None
    if f.kind == "lokr" and factor_shape(f, shape) == tuple(shape[:2]):
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
    return None
