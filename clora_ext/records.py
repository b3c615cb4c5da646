"""What each sampling step did (``StepRecord``), and the per-image summary of the updates the host prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class StepRecord:
    """What one sampling step did. Refinement decisions are per image, so is most of this."""

    step: int
    iterations: int = 0  # gradient passes that updated at least one image
    losses: list[float] = field(default_factory=list)  # per gradient pass: summed over the images it ran
    image_losses: dict[int, list[float]] = field(default_factory=dict)  # image -> its loss at each of its passes
    image_updates: dict[int, int] = field(default_factory=dict)  # image -> updates kept (taken-back ones excluded)
    loss_after: float | None = None  # loss of the maps the fused prediction used, summed over the images
    image_loss_after: list[float] = field(default_factory=list)  # the same, per image
    overlap_after: float | None = None
    batch_images: list[int] | None = None  # batch position of each image when the step ran a part of a batch

    def batch_image(self, b: int) -> int:
        return self.batch_images[b] if self.batch_images is not None else b


def update_summary(records: Sequence[StepRecord]) -> list[str]:
    """One line per image: its contrastive loss before and after the updates, each pair at the same step.

    "Before" is the loss at the latent the sampler handed over, "after" the loss of the maps
    the step's fused prediction used, so both come from one timestep.
    """
    per_image: dict[int, list[tuple[StepRecord, int]]] = {}
    for r in records:
        if r.image_updates and r.image_loss_after:
            for b in r.image_losses:
                per_image.setdefault(r.batch_image(b), []).append((r, b))
    lines = []
    for image in sorted(per_image):
        steps = per_image[image]
        pairs = [(r.image_losses[b][0], r.image_loss_after[b]) for r, b in steps]
        first, fb = steps[0]
        kept = sum(r.image_updates.get(b, 0) for r, b in steps)
        before, after = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        lines.append(
            f"image {image + 1}: contrastive loss {pairs[0][0]:.4f} -> {pairs[0][1]:.4f} at step {first.step + 1} "
            f"({first.image_updates.get(fb, 0)} updates); mean {before:.4f} -> {after:.4f} over its "
            f"{len(steps)} update steps ({kept} updates kept)"
        )
    return lines
