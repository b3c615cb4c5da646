"""Masks from attention maps and the masked fusion of variant predictions (docs/algorithm.md, section 5)."""

from __future__ import annotations

import enum
from typing import Any, Protocol, Sequence

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


class MaskOverlap(str, enum.Enum):
    """Where several variants' maps pass the threshold at one pixel.

    - SHARED: every such variant keeps the pixel and ``fuse`` averages their predictions (the paper's);
    - EXCLUSIVE: the pixel goes to the one variant whose map is strongest there, each map measured
      against its own peak (the quantity the threshold tests), so every pixel has one owner.
    """

    SHARED = "shared"
    EXCLUSIVE = "exclusive"


def variant_masks(
    maps: torch.Tensor,
    mask_for: torch.Tensor,
    n_variants: int,
    threshold: float,
    morphology: Morphology | str = Morphology.NONE,
    overlap: MaskOverlap | str = MaskOverlap.SHARED,
) -> torch.Tensor:
    """Masks (n_variants, h, w) of one image from its token maps (P, h, w).

    M_k (k >= 1) is the union over the maps with ``mask_for == k`` (which maps those are is the
    mask-token rule's choice, ``mask_sources``) of ``A >= threshold * max A``; with ``overlap``
    EXCLUSIVE a pixel several M_k cover stays only in the one whose ``A / max A`` is largest there.
    Then optional 3x3 morphology; M_0 is set wherever no M_k is.
    """
    h, w = maps.shape[-2:]
    peak = maps.flatten(1).max(dim=1).values.clamp_min(torch.finfo(maps.dtype).tiny)
    token_masks = maps >= threshold * peak[:, None, None]
    exclusive = MaskOverlap(overlap) is MaskOverlap.EXCLUSIVE
    masks = torch.zeros(n_variants, h, w, dtype=torch.float32, device=maps.device)
    # each variant's strength at every pixel: its strongest chosen map there, relative to that map's peak
    strength = torch.full((n_variants, h, w), -1.0, dtype=torch.float32, device=maps.device)
    for k in range(1, n_variants):
        chosen = mask_for == k
        if chosen.any():
            masks[k] = token_masks[chosen].any(dim=0).float()
            if exclusive:
                strength[k] = (maps[chosen].float() / peak[chosen, None, None].float()).amax(dim=0)
    if exclusive and n_variants > 1:
        winner = strength[1:].argmax(dim=0) + 1
        masks = masks * (torch.arange(n_variants, device=maps.device)[:, None, None] == winner).float()
    masks[1:] = morph(masks[1:], morphology)
    masks[0] = (masks[1:].sum(dim=0) == 0).float() if n_variants > 1 else 1.0
    return masks


class MaskTokens(str, enum.Enum):
    """Which token maps make variant k's mask.

    - PAPER: V_k's own mask tokens, its trigger words and its subject (the paper's rule);
    - SUBJECT: V_k's own subject tokens only (trigger words left out);
    - BASE: the base prompt's maps of subject k;
    - BASE_SUBJECT: both of the last two.
    """

    PAPER = "paper"
    SUBJECT = "subject"
    BASE = "base"
    BASE_SUBJECT = "base_subject"


def mask_sources(specs: Sequence, rule: MaskTokens | str) -> torch.Tensor:
    """For each token map of ``specs`` (TokenMapSpec), the variant whose mask it makes under ``rule``, or -1.

    A concept's variant is the one whose own mask tokens are that concept's; the base prompt is variant 0.
    """
    rule = MaskTokens(rule)
    owner = {s.concept: s.variant for s in specs if s.mask}
    out = []
    for s in specs:
        own = s.mask and (rule is MaskTokens.PAPER or not s.trigger)
        base = s.variant == 0 and s.concept in owner
        if rule is MaskTokens.PAPER or rule is MaskTokens.SUBJECT:
            out.append(s.variant if own else -1)
        elif rule is MaskTokens.BASE:
            out.append(owner[s.concept] if base else -1)
        else:
            out.append(s.variant if own else owner[s.concept] if base else -1)
    return torch.tensor(out, dtype=torch.long)


class MaskUpsampling(str, enum.Enum):
    """How the masks of the H/32 maps grow to the latent's size.

    - NEAREST: blocks of the map's cells (hard seams between variants);
    - BILINEAR: soft edges one cell wide. Interpolation is linear, so the masks still
      sum to at least 1 at every pixel and ``fuse`` normalises them as before;
    - CONTOUR: the *maps* grow bilinearly to the latent's size and are thresholded there, so
      the masks stay hard but their edges follow the maps' level lines instead of the cells'
      block grid (morphology, if any, then acts at the latent's size).
    """

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    CONTOUR = "contour"


def resize_masks(masks: torch.Tensor, size: tuple[int, int],
                 upsampling: MaskUpsampling | str = MaskUpsampling.NEAREST) -> torch.Tensor:
    """Resize (..., h, w) masks to ``size`` = (H, W) (CONTOUR masks are made at that size already)."""
    shape = masks.shape
    if shape[-2:] == tuple(size):
        return masks.float()
    flat = masks.reshape(-1, 1, *shape[-2:]).float()
    if MaskUpsampling(upsampling) is MaskUpsampling.BILINEAR:
        m = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    else:
        m = F.interpolate(flat, size=size, mode="nearest")
    return m.reshape(*shape[:-2], *size)


class MaskSettings(Protocol):
    """What the shipped masks read of the engine's settings (``EngineSettings``), at each step."""

    schedule: Any  # update.Schedule: masks_at(step, total)
    mask_threshold: float
    morphology: Morphology
    mask_tokens: MaskTokens
    mask_upsampling: MaskUpsampling
    mask_overlap: MaskOverlap
    soft_edges_from: float


class MaskMethod(Protocol):
    """How one step's token maps become the variants' fusion masks: the engine calls it once per fused
    pass with the (B, P, h, w) maps of the cond rows and their specs (tokens.TokenMapSpec), and
    fuses with the (B, V, H, W) masks it returns. ``step_masks`` is the shipped method."""

    def __call__(self, maps: torch.Tensor, specs: Sequence, variants: int, latent_hw: tuple[int, int], step: int,
                 total_steps: int, settings: Any) -> torch.Tensor: ...


def threshold_masks(maps: torch.Tensor, specs: Sequence, variants: int, latent_hw: tuple[int, int],
                    settings: MaskSettings, upsampling: MaskUpsampling | str) -> torch.Tensor:
    """(B, V, H, W) masks from (B, P, h, w) maps: each variant's mask tokens (``mask_tokens``)
    thresholded, shared or owned where they overlap, grown to the latent's size by ``upsampling``."""
    upsampling = MaskUpsampling(upsampling)
    mask_for = mask_sources(specs, settings.mask_tokens).to(maps.device)
    if upsampling is MaskUpsampling.CONTOUR:  # threshold at the latent's size
        maps = F.interpolate(maps.float(), size=tuple(latent_hw), mode="bilinear", align_corners=False)
    small = torch.stack([variant_masks(m, mask_for, variants, settings.mask_threshold, settings.morphology,
                                       settings.mask_overlap) for m in maps])
    return resize_masks(small, tuple(latent_hw), upsampling)


def step_masks(maps: torch.Tensor, specs: Sequence, variants: int, latent_hw: tuple[int, int], step: int,
               total_steps: int, settings: MaskSettings) -> torch.Tensor:
    """The shipped ``MaskMethod`` (docs/algorithm.md section 5): equal weights before
    ``schedule.mask_start``, then ``threshold_masks`` with the settings' ``mask_upsampling``, or soft
    (bilinear) edges from ``soft_edges_from`` on."""
    if not settings.schedule.masks_at(step, total_steps):
        return torch.ones(maps.shape[0], variants, *latent_hw, device=maps.device)
    late = step >= round(settings.soft_edges_from * total_steps)
    upsampling = MaskUpsampling.BILINEAR if late else settings.mask_upsampling
    return threshold_masks(maps, specs, variants, latent_hw, settings, upsampling)


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
