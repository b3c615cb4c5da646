"""The latent update of one sampling step (docs/algorithm.md section 4), apart from the model.

``LatentOptimiser.run`` takes gradient steps on the contrastive loss, which the engine's
gradient pass gives as ``loss_at(z, images)``; every image of a batch refines, stops (``refine_tolerance``)
and takes back an overshooting update on its own loss. On a half-precision model the gradient is
computed with a loss scale that keeps it out of fp16's zero and overflow (``_gradient``). An out of
memory error in the backward pass turns the updates off for the generation (``enabled``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch

from .records import StepRecord
from .update import LatentSpace, apply_update, without_region_means

# a gradient pass's backward: (weights per image, keep the graph for another call) -> d(weights . losses)/dx
Backward = Callable[[torch.Tensor, bool], torch.Tensor]
# the images' losses at a latent, and their backward, while the block is open
# (latents of some of the batch's images, which images they are) -> their losses and backward
LossAt = Callable[[torch.Tensor, torch.Tensor], ContextManager[tuple[torch.Tensor, Backward]]]

@dataclass(frozen=True)
class TwoPaths:
    """A backward that also gives the gradient through each subject's own-variant maps alone
    (``own``), for an update that treats the two paths apart (``keeps_means_others_only``)."""

    whole: Backward
    own: Backward

    def __call__(self, weights: torch.Tensor, retain: bool) -> torch.Tensor:
        return self.whole(weights, retain)


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


LOSS_SCALE_FACTOR = 2.0**8  # fp16 spans 2^-24 .. 2^16: each retry moves the gradient by a third of that
LOSS_SCALE_TRIES = 4


def _zero_gradient_message(half: bool) -> str:
    if half:
        return ("CLoRA: the latent gradient is zero even with loss scaling (half-precision model); no latent "
                "update runs. Run the model in full precision (--no-half) for the updates")
    return "CLoRA: the latent gradient is zero; no latent update runs"


class UpdateSettings(Protocol):
    """What the update reads of the engine's settings (``EngineSettings``), at each run."""

    step_size: float
    refine_tolerance: float | None
    momentum: float
    update_keeps_means: bool
    keeps_means_others_only: bool


class LatentOptimiser:
    """The latent update's state for one generation: the loss scale that last worked (fp16) and
    whether updates still run."""

    def __init__(self, half: bool, on_refine: Callable[[int, int], None], interrupted: Callable[[], bool],
                 warn: Callable[[str, str], None]):
        self.half = half
        self.on_refine = on_refine
        self.interrupted = interrupted
        self.warn = warn  # (key, message): said once per key
        self.enabled = True
        self.loss_scale = 1.0

    def run(self, x: torch.Tensor, space: LatentSpace, loss_at: LossAt, iterations: int, record: StepRecord,
            settings: UpdateSettings, region: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> None:
        """Update ``x`` in place over ``iterations`` gradient steps; every image of the batch refines, stops
        and takes back on its own loss. ``loss_at(z, images)``: the losses at ``z`` (the latents of ``x``'s
        images ``images``) and their backward (``CLoRAEngine.differentiable_loss``); ``region``: where the
        update may act (the inpaint mask); ``masks``: the previous step's masks of these images (``keeps_means``' regions)."""
        tolerance = settings.refine_tolerance
        active = torch.arange(x.shape[0], device=x.device)
        previous_loss: dict[int, float] = {}
        previous_x = x.detach().clone() if tolerance is not None else None
        velocity = torch.zeros_like(x, dtype=torch.float32) if settings.momentum else None
        for i in range(iterations):
            if i > 0:
                self.on_refine(i, iterations - 1)
            if self.interrupted():
                return
            try:
                with loss_at(x.index_select(0, active), active) as (losses_t, backward):
                    losses = losses_t.detach().float().cpu().tolist()
                    if not all(math.isfinite(v) for v in losses):
                        self.warn("nonfinite", "CLoRA: non-finite loss or gradient; that latent update was skipped")
                        return
                    record.losses.append(sum(losses))
                    keep = []
                    for j, (b, loss) in enumerate(zip(active.tolist(), losses)):
                        record.image_losses.setdefault(b, []).append(loss)
                        before = previous_loss.get(b)
                        # decide before the backward pass: an image that stops costs no gradient
                        if before is not None and tolerance is not None:
                            if loss > before:  # its last update overshot: take it back, stop this image
                                x[b].copy_(previous_x[b])
                                record.image_updates[b] -= 1
                                continue
                            if before - loss < tolerance * abs(before):
                                continue
                        keep.append(j)
                    if not keep:
                        return
                    kept = torch.tensor(keep, device=x.device)
                    weights = torch.zeros_like(losses_t)
                    weights[kept] = 1.0
                    loss_kept = float(losses_t.index_select(0, kept).sum())
                    two = isinstance(backward, TwoPaths) and settings.update_keeps_means
                    grad = self._gradient(backward, weights, loss_kept, keep_graph=two)
                    grad_own = self._gradient(backward.own, weights, loss_kept) if two else None
            except OUT_OF_MEMORY:  # in the backward pass (the forward retries in halves)
                self.enabled = False
                self.warn("oom", "CLoRA: out of memory in the gradient pass; latent updates skipped for this image")
                return
            grad = grad.index_select(0, kept)
            if not torch.isfinite(grad).all():
                self.warn("nonfinite", "CLoRA: non-finite loss or gradient; that latent update was skipped")
                return
            active = active.index_select(0, kept)
            if not grad.any() and any(losses[j] != 0 for j in keep):
                self.warn("zero_gradient", _zero_gradient_message(self.half))
                return
            if settings.update_keeps_means:
                regions = masks
                if regions is not None and regions.shape[0] == x.shape[0]:
                    regions = regions.index_select(0, active.to(regions.device))
                elif regions is not None:  # another batch shape than the last step's: no regions to keep
                    regions = None
                if grad_own is None:
                    grad = without_region_means(grad, regions)
                else:  # only the path through the other variants' maps loses its regional means
                    grad_own = grad_own.index_select(0, kept)
                    grad = grad_own + without_region_means(grad - grad_own, regions)
            if region is not None:  # after the means: nothing moves outside the inpainted region
                grad = grad * (region if region.dim() < 4 or region.shape[0] == 1 else region.index_select(0, active))
            if velocity is not None:
                grad = velocity.index_select(0, active).mul_(settings.momentum).add_(grad)
                velocity.index_copy_(0, active, grad)
            images = active.tolist()
            if previous_x is not None:
                previous_x[active] = x[active]
                previous_loss.update({b: losses[j] for b, j in zip(images, keep)})
            moved = x.index_select(0, active)
            apply_update(moved, grad, settings.step_size, space.select(active))
            x.index_copy_(0, active, moved)
            for b in images:
                record.image_updates[b] = record.image_updates.get(b, 0) + 1
            record.iterations += 1

    def _gradient(self, backward: Backward, weights: torch.Tensor, loss: float, keep_graph: bool = False) -> torch.Tensor:
        """d(sum of ``weights`` * losses) / d x (float32). On an fp16 model a gradient that flushes to zero
        in the half-precision activations is computed again with the loss scaled up, one that overflows
        with it scaled down (the graph is kept for those retries); the scale that worked is kept for the
        next pass. ``loss``: the weighted loss's value, to tell a zero gradient from a flat loss;
        ``keep_graph``: the graph stays for another backward."""
        if not self.half:
            return backward(weights, keep_graph).float()
        scale = self.loss_scale
        for attempt in range(LOSS_SCALE_TRIES):
            last = attempt == LOSS_SCALE_TRIES - 1
            grad = backward(weights * scale, keep_graph or not last).float() / scale
            if not torch.isfinite(grad).all():
                scale /= LOSS_SCALE_FACTOR
            elif not grad.any() and loss != 0:
                scale *= LOSS_SCALE_FACTOR
            else:
                self.loss_scale = scale
                break
        return grad
