"""Gallery previews: each image's token maps and masks, drawn with the core's panels (pure).

The maps and masks are those of the last step of the first pass. Map titles are
the concept's subject; ``*`` marks the variant's own mask tokens (its trigger and
subject).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ..engine import StepOutput
from ..previews import maps_panel, masks_panel
from ..tokens import TokenMapSpec


class PreviewStore:
    def __init__(self) -> None:
        self._latest: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, Sequence[TokenMapSpec], list[str]]] = {}
        self._subjects: list[str] = []

    def record(self, iteration: int, images: Sequence[int], out: StepOutput, specs: Sequence[TokenMapSpec], plan: Any) -> None:
        """Keep the maps and masks of ``out`` (one engine step over the batch images ``images``)."""
        self._subjects = [c.subject for c in plan.composition.content]
        variants = ["base"] + [c.subject for c in plan.composition.content]
        for j, image in enumerate(images):
            self._latest[(iteration, image)] = (out.maps[j].detach().cpu(), out.masks[j].detach().cpu(), specs, variants)

    def images(self) -> list[Image.Image]:
        return [self._image(*entry) for _, entry in sorted(self._latest.items())]

    def _image(self, maps: torch.Tensor, masks: torch.Tensor, specs: Sequence[TokenMapSpec], variants: list[str]) -> Image.Image:
        names = [self._subjects[s.concept] + ("*" if s.mask else "") for s in specs]
        top, bottom = maps_panel(maps, specs, variants, names), masks_panel(masks, variants)
        out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
        out.paste(top, (0, 0))
        out.paste(bottom, (0, top.height))
        return out
