"""Shared sampler pieces, like ``modules.sd_samplers_common``."""

from __future__ import annotations

from dataclasses import dataclass


class InterruptedException(BaseException):
    pass


@dataclass
class SamplerConfig:
    name: str
    funcname: str
    second_order: bool = False

    def total_steps(self, steps: int) -> int:
        """Model calls for ``steps`` steps: second-order samplers call the model twice per step but the last."""
        return steps * 2 - 1 if self.second_order else steps


def setup_img2img_steps(p, steps=None) -> tuple[int, int]:
    """The schedule length and the steps that run at the denoising strength (the host's rule without
    ``img2img_fix_steps``)."""
    steps = steps or p.steps
    return steps, int(min(p.denoising_strength, 0.999) * steps)


def apply_refiner(denoiser, sigma=None) -> bool:
    return False
