"""Contrastive objective over attention maps (docs/algorithm.md, section 4)."""

from __future__ import annotations

import enum
from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_TAU = 0.5
DEFAULT_EPS = 1e-8


def minmax_normalise(maps: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Flatten each map and scale it to [0, 1]; ``eps`` guards constant maps."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return (flat - lo) / (hi - lo + eps)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """NT-Xent (InfoNCE) over all positive pairs, cosine similarity, temperature ``tau``.

    For every ordered pair (i, j), i != j, of equal labels:
    ``-log(exp(s_ij/tau) / (exp(s_ij/tau) + sum_{k: label_k != label_i} exp(s_ik/tau)))``,
    averaged over those pairs. Zero when there are no positive or no negative pairs.
    """
    z = F.normalize(embeddings.float(), dim=1)
    sim = z @ z.T / tau
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    if not positive.any() or not negative.any():
        return sim.sum() * 0.0
    neg_lse = torch.logsumexp(sim.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    # -log(e^s / (e^s + e^n)) = softplus(n - s); rows without negatives give softplus(-inf) = 0
    losses = F.softplus(neg_lse - sim)
    return losses[positive].mean()


def contrastive_loss(
    maps: torch.Tensor, labels: torch.Tensor, tau: float = DEFAULT_TAU, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The CLoRA loss of one image: min-max normalised token maps, NT-Xent over concept labels."""
    return nt_xent(minmax_normalise(maps, eps), labels, tau)


def concept_overlap(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between maps of different concepts (lower = better separated)."""
    z = F.normalize(maps.flatten(1).float(), dim=1)
    sim = z @ z.T
    different = labels[:, None] != labels[None, :]
    if not different.any():
        return sim.new_zeros(())
    return sim[different].mean()


class LossTokens(str, enum.Enum):
    """Which token maps the contrastive loss compares.

    - PAPER: every planned map: the subject words in every variant and each variant's trigger words;
    - SUBJECT: the subject words only. A trigger word's map need not lie on its subject (a rare
      token the LoRA binds to the colour, not the place), and pulling it there moves the latent
      against the subject it belongs to;
    - AGREEING: the subject words, and each trigger word whose map lies with its own subject: at
      every pass, the trigger map is kept when it is closer (cosine of the min-max normalised maps)
      to its own concept's subject maps than to any other concept's (``agreeing_maps``).
    """

    PAPER = "paper"
    SUBJECT = "subject"
    AGREEING = "agreeing"


class LossGradient(str, enum.Enum):
    """Through which token maps the contrastive loss's gradient reaches the latent.

    - ALL: every map of the loss, the paper's;
    - OWN: only each concept's maps in its own variant (its LoRA active); the other variants'
      maps (the base prompt's, the other LoRAs') enter the loss as fixed anchors. A subject
      word's map in a variant without that subject's LoRA is strongest where the region has the
      base model's colours for the word, and its gradient paints them over the LoRA's.
    """

    ALL = "all"
    OWN = "own"


def with_gradient_through(maps: torch.Tensor, own: torch.Tensor, rule: LossGradient | str) -> torch.Tensor:
    """``maps`` (..., P, h, w) with the gradient stopped on every map ``rule`` leaves out
    (``own``: a boolean per map, the map is of its concept's own variant)."""
    if LossGradient(rule) is LossGradient.ALL:
        return maps
    keep = own.to(maps.device)[:, None, None]
    return torch.where(keep, maps, maps.detach())


def loss_maps(specs: Sequence, rule: LossTokens | str) -> torch.Tensor:
    """Which maps of ``specs`` (TokenMapSpec) enter the loss under ``rule``: a boolean per map
    (AGREEING: the maps it may keep, the subject words and the triggers; ``agreeing_maps`` picks)."""
    if LossTokens(rule) in (LossTokens.PAPER, LossTokens.AGREEING):
        return torch.ones(len(specs), dtype=torch.bool)
    return torch.tensor([not s.trigger for s in specs], dtype=torch.bool)


def agreeing_maps(maps: torch.Tensor, labels: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Of one image's maps (P, h, w), which lie with their own concept (a boolean per map; no gradient).

    Every non-trigger map is kept. A trigger map is kept when its cosine similarity to the mean of
    its own concept's subject maps is higher than to the mean of any other concept's; a trigger
    whose concept has no subject map is kept (nothing to compare with). Written without
    value-dependent shapes, so that it runs inside a torch.func transform."""
    concepts = labels[~trigger].unique()
    if len(concepts) < 2:
        return torch.ones_like(trigger)
    members = ((labels[None, :] == concepts[:, None]) & ~trigger[None, :]).float()  # (concepts, P)
    with torch.no_grad():
        z = F.normalize(minmax_normalise(maps.detach()).float(), dim=1)
        centroids = F.normalize((members / members.sum(dim=1, keepdim=True)) @ z, dim=1)
        nearest = concepts.index_select(0, (z @ centroids.T).argmax(dim=1))
    own = (labels[:, None] == concepts[None, :]).any(dim=1)
    return ~trigger | ~own | (nearest == labels)


def masked_contrastive_loss(maps: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                            tau: float = DEFAULT_TAU, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``contrastive_loss(maps[keep], labels[keep])`` for a ``keep`` computed from the maps' values,
    written with masks instead of indexing (no value-dependent shapes, see ``agreeing_maps``)."""
    z = F.normalize(minmax_normalise(maps, eps).float(), dim=1)
    sim = z @ z.T / tau
    pair = keep[:, None] & keep[None, :]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye & pair
    negative = ~same & pair
    # a row without negatives (a map left out) has no positive pair either: it takes every column
    # instead, so that no logsumexp runs over -inf alone (its gradient would be NaN), and is masked out
    columns = negative | ~negative.any(dim=1, keepdim=True)
    neg_lse = torch.logsumexp(sim.masked_fill(~columns, float("-inf")), dim=1, keepdim=True)
    losses = F.softplus(neg_lse - sim).masked_fill(~positive, 0.0)
    pairs = positive.sum()
    mean = losses.sum() / pairs.clamp_min(1)
    return torch.where((pairs > 0) & negative.any(), mean, sim.sum() * 0.0)
