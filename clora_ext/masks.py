"""Masks from attention maps and the masked fusion of variant predictions (docs/algorithm.md, section 5)."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


class Morphology(str, enum.Enum):
    NONE = "none"
    ERODE = "erode"
    DILATE = "dilate"
    OPEN = "open"
    CLOSE = "close"


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    # pad with ones so the image border does not eat into a mask
    padded = F.pad(mask, (1, 1, 1, 1), value=1.0)
    return -F.max_pool2d(-padded, kernel_size=3, stride=1)


def morph(masks: torch.Tensor, op: Morphology | str) -> torch.Tensor:
    """3x3 binary morphology on masks of shape (..., h, w)."""
    op = Morphology(op)
    if op is Morphology.NONE:
        return masks
    shape = masks.shape
    m = masks.reshape(-1, 1, *shape[-2:]).float()
    if op is Morphology.ERODE:
        m = _erode(m)
    elif op is Morphology.DILATE:
        m = _dilate(m)
    elif op is Morphology.OPEN:
        m = _dilate(_erode(m))
    else:
        m = _erode(_dilate(m))
    return m.reshape(shape).to(masks.dtype)


def variant_masks(
    maps: torch.Tensor,
    variant_of_map: torch.Tensor,
    mask_map: torch.Tensor,
    n_variants: int,
    threshold: float,
    morphology: Morphology | str = Morphology.NONE,
) -> torch.Tensor:
    """Masks (n_variants, h, w) of one image from its token maps (P, h, w).

    M_k (k >= 1) is the union over V_k's mask tokens of ``A >= threshold * max A``,
    optionally smoothed by 3x3 morphology; M_0 is set wherever no M_k is.
    """
    h, w = maps.shape[-2:]
    peak = maps.flatten(1).max(dim=1).values.clamp_min(torch.finfo(maps.dtype).tiny)
    token_masks = maps >= threshold * peak[:, None, None]
    masks = torch.zeros(n_variants, h, w, dtype=torch.float32, device=maps.device)
    for k in range(1, n_variants):
        chosen = mask_map & (variant_of_map == k)
        if chosen.any():
            masks[k] = token_masks[chosen].any(dim=0).float()
    masks[1:] = morph(masks[1:], morphology)
    masks[0] = (masks[1:].sum(dim=0) == 0).float() if n_variants > 1 else 1.0
    return masks


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (..., h, w) masks to ``size`` = (H, W)."""
    shape = masks.shape
    m = F.interpolate(masks.reshape(-1, 1, *shape[-2:]).float(), size=size, mode="nearest")
    return m.reshape(*shape[:-2], *size)


def fuse(predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """e = sum_k M_k e_k / sum_k M_k for predictions (V, C, H, W) and masks (V, H, W).

    Overlaps are normalised; a pixel no mask covers (possible only with morphology
    off and M_0 removed by the caller) falls back to the plain average.
    """
    m = masks.to(predictions.dtype)[:, None]
    total = m.sum(dim=0)
    uncovered = total == 0
    if uncovered.any():
        m = torch.where(uncovered, torch.ones_like(m), m)
        total = m.sum(dim=0)
    return (m * predictions).sum(dim=0) / total
