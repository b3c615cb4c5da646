"""kohya LoRA and LoCon, PEFT: W' = W + scale * up @ down, kept low-rank (tensors: up, down, mid)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..routing import Delta, LowRankDelta
from . import Factors


def factor_shape(f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
    if f.get("up") is None or f.get("down") is None:
        return None
    return f.get("up").shape[0], f.get("down").shape[1]


def routed_delta(f: Factors, weight_shape: Sequence[int]) -> Delta | None:
    """Low-rank as the file holds it; a CP ``mid`` core is built dense by the host."""
    shape = torch.Size(weight_shape)
    up, down = f.get("up"), f.get("down")
    if f.get("mid") is not None or up is None:
        return None
    # a conv's kernel is down's (up is 1x1); a Linear takes factors written as 1x1 convs too
    kernel = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
    if (up.shape[0], down.shape[1]) != tuple(shape[:2]) or kernel != (tuple(shape[2:]) or (1, 1)):
        return None
    return LowRankDelta(down=down, up=up, scale=f.scale)
