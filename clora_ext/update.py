"""Latent update and its schedule (docs/algorithm.md, section 4).

The step size alpha is defined in the DDPM latent space (x_t = sqrt(abar) z0 +
sqrt(1 - abar) eps), where the paper and Attend-and-Excite take their steps. In
k-diffusion's sigma space (x = x_t / sqrt(abar), UNet input x * c_in with
c_in = 1/sqrt(sigma^2 + 1)) the same step reads x <- x - alpha (sigma^2 + 1) grad_x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DDPMSpace:
    """Timestep samplers (DDIM, PLMS, UniPC): the latent is x_t itself."""

    def gradient_scale(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.ones(batch, device=device)

    def select(self, images: torch.Tensor) -> "DDPMSpace":
        """The space of a subset of the batch's images."""
        return self


@dataclass(frozen=True)
class SigmaSpace:
    """k-diffusion samplers: the latent is x_t / sqrt(abar), one sigma per image."""

    sigma: torch.Tensor

    def gradient_scale(self, batch: int, device: torch.device) -> torch.Tensor:
        sigma = self.sigma.to(device=device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        return sigma**2 + 1

    def select(self, images: torch.Tensor) -> "SigmaSpace":
        """The space of a subset of the batch's images (one shared sigma stays shared)."""
        sigma = self.sigma.reshape(-1)
        return self if sigma.numel() == 1 else SigmaSpace(sigma.index_select(0, images.to(sigma.device)))


LatentSpace = DDPMSpace | SigmaSpace


def apply_update(latent: torch.Tensor, grad: torch.Tensor, step_size: float, space: LatentSpace) -> None:
    """``latent -= step_size * scale * grad`` in place, with the space's per-image scale."""
    scale = space.gradient_scale(latent.shape[0], latent.device)
    scale = scale.reshape(-1, *([1] * (latent.dim() - 1))).to(latent.dtype)
    latent.sub_(step_size * scale * grad.to(latent.dtype))


def without_region_means(grad: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """``grad`` (B, C, H, W) less its part that is constant on each mask's region, so that a step along it
    moves no region's mean (in the latent: a region's colour), only what varies inside the region.

    ``masks`` (B, V, H, W), normalised per pixel into weights w_k: per image and channel, the least-squares
    fit sum_k a_k w_k of grad is subtracted, which leaves sum_hw w_k * result = 0 for every k (hard masks:
    each region's mean is subtracted). None (no masks yet: the first step) takes the whole picture as one region.
    """
    g = grad.float()
    if masks is None:
        return (g - g.mean(dim=(-2, -1), keepdim=True)).to(grad.dtype)
    w = masks.to(device=g.device, dtype=torch.float32)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    gram = torch.einsum("bvhw,bkhw->bvk", w, w)  # (B, V, V); a variant with no pixels has a zero row
    gram = gram + 1e-6 * gram.diagonal(dim1=1, dim2=2).amax(dim=1)[:, None, None] * torch.eye(w.shape[1], device=g.device)
    coefficients = torch.linalg.solve(gram, torch.einsum("bvhw,bchw->bvc", w, g))  # (B, V, C)
    return (g - torch.einsum("bvhw,bvc->bchw", w, coefficients)).to(grad.dtype)


@dataclass(frozen=True)
class Schedule:
    """When to update, refine and mask, as fractions of the step count.

    Paper defaults at 50 steps: updates at steps 0-24, refinement at 0, 10 and 20.
    """

    update_fraction: float = 0.5
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    # the paper's 20 iterations cost 2.8x the gradient passes of 5 at 20 steps for no measurable gain in
    # composition (bench.defaults and bench.quality, docs/quality.md); 5 is the shipped default
    refine_iterations: int = 5
    mask_start: float = 0.0

    def updates_at(self, step: int, total: int) -> bool:
        return step < round(self.update_fraction * total)

    def iterations_at(self, step: int, total: int) -> int:
        """How many update iterations step ``step`` runs (0 when it does not update)."""
        if not self.updates_at(step, total):
            return 0
        refine = step in {round(f * total) for f in self.refine_at}
        return 1 + (self.refine_iterations if refine else 0)

    def masks_at(self, step: int, total: int) -> bool:
        return step >= round(self.mask_start * total)


def schedule_notes(schedule: Schedule, total: int, model_calls: int | None = None, content_concepts: int = 2) -> list[str]:
    """What will run differently from the schedule as set, in words for the infotext notes.

    ``total``: the steps the schedule is counted over; ``model_calls``: the steps the
    sampler really runs, when it differs (the host's DDIM runs N-1 for N steps).
    """
    notes = []
    if content_concepts < 2:
        notes.append("one content subject: the contrastive loss needs two, so no latent update runs "
                     "(masks and fusion only)")
        return notes
    last_update = round(schedule.update_fraction * total)
    past = [f for f in schedule.refine_at if round(f * total) >= last_update]
    if schedule.refine_iterations and past:
        points = ", ".join(f"{f:g}" for f in past)
        notes.append(f"refine at {points}: at or past the update fraction {schedule.update_fraction:g}, "
                     "so no refinement runs there")
    if model_calls is not None and model_calls != total:
        ran = min(last_update, model_calls)
        notes.append(f"the sampler runs {model_calls} model steps for {total} steps; the schedule counts {total} "
                     f"(updates in the first {ran} of the {model_calls})")
    return notes
