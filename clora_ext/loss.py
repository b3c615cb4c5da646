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
      against the subject it belongs to.
    """

    PAPER = "paper"
    SUBJECT = "subject"


def loss_maps(specs: Sequence, rule: LossTokens | str) -> torch.Tensor:
    """Which maps of ``specs`` (TokenMapSpec) enter the loss under ``rule``: a boolean per map."""
    if LossTokens(rule) is LossTokens.PAPER:
        return torch.ones(len(specs), dtype=torch.bool)
    return torch.tensor([not s.trigger for s in specs], dtype=torch.bool)
