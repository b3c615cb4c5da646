"""k-diffusion samplers, like ``modules.sd_samplers_kdiffusion`` (Euler-family loops written here).

The inner model works in sigma space: it is handed x (= x_t / sqrt(abar)) and sigma,
and returns the denoised x0.
"""

from __future__ import annotations

import torch

from . import sd_samplers_common, shared
from .sd_samplers_cfg_denoiser import CFGDenoiser


class CFGDenoiserKDiffusion(CFGDenoiser):
    def create_wrap(self, model):
        return model.create_denoiser()


class Sampler:
    """Shared by both families: step counting and interruption as the host does them."""

    denoiser_class = CFGDenoiser

    def __init__(self, config, model):
        self.config = config
        self.funcname = config.funcname
        self.model = model
        self.model_wrap_cfg = self.denoiser_class(self)
        self.last_latent = None

    def initialize(self, p) -> None:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        return {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                "s_min_uncond": getattr(p, "s_min_uncond", 0.0), "image_cond": image_conditioning}


class KDiffusionSampler(Sampler):
    denoiser_class = CFGDenoiserKDiffusion

    def sigmas(self, steps: int) -> torch.Tensor:
        schedule = self.model.schedule
        t = schedule.timesteps(steps)
        return torch.cat([schedule.sigmas[t.long()].float(), torch.zeros(1)])

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.sigmas(steps)
        self.initialize(p)
        x = x * sigmas[0]
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        self.last_latent = x
        return self.launch_sampling(steps, lambda: self._loop(x, sigmas, extra))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.sigmas(steps)[steps - t_enc - 1:]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        xi = x + noise * sigmas[0]
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        self.last_latent = xi
        return self.launch_sampling(t_enc + 1, lambda: self._loop(xi, sigmas, extra))

    def _loop(self, x: torch.Tensor, sigmas: torch.Tensor, extra: dict) -> torch.Tensor:
        model = self.model_wrap_cfg
        ones = x.new_ones(x.shape[0])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * ones, **extra)
            self.last_latent = denoised
            d = (x - denoised) / sigmas[i]
            if self.funcname == "sample_heun" and sigmas[i + 1] > 0:  # second order: a trial point
                x_trial = x + d * (sigmas[i + 1] - sigmas[i])
                d = (d + (x_trial - model(x_trial, sigmas[i + 1] * ones, **extra)) / sigmas[i + 1]) / 2
            x = x + d * (sigmas[i + 1] - sigmas[i])
            shared.state.sampling_step = i
        return x
