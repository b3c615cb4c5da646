"""Timestep samplers (DDIM), like ``modules.sd_samplers_timesteps``: the model sees x_t and
returns eps; N steps are N-1 model calls."""

from __future__ import annotations

import torch

from .sd_samplers_cfg_denoiser import CFGDenoiser
from .sd_samplers_kdiffusion import Sampler

FUNCTIONS = ("ddim", "ddim_cfgpp", "unipc", "plms")


class CFGDenoiserTimesteps(CFGDenoiser):
    def create_wrap(self, model):
        return model.create_eps_denoiser()


class CompVisSampler(Sampler):
    denoiser_class = CFGDenoiserTimesteps

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self._ddim(x, steps, extra))

    def _ddim(self, x: torch.Tensor, steps: int, extra: dict) -> torch.Tensor:
        abar = self.model.schedule.alphas_cumprod.float()
        t = self.model.schedule.timesteps(steps).long()
        ones = x.new_ones(x.shape[0])
        for i in range(steps - 1):
            a, a_next = abar[t[i]], abar[t[i + 1]]
            eps = self.model_wrap_cfg(x, t[i] * ones, **extra)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            self.last_latent = x0
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x
