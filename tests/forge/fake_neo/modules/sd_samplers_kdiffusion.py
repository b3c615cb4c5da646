"""k-diffusion samplers, like Neo's ``modules.sd_samplers_kdiffusion`` (Euler-family loops written here).

The sampler hands the CFG denoiser its own x (x_t / sqrt(abar)) and sigma; the loop goes
on from that same x object, so an in-place change of x inside a model call is kept.
"""

from __future__ import annotations

import torch

from . import sd_samplers_common, shared
from .sd_samplers_cfg_denoiser import CFGDenoiser


class KDiffusionSampler:
    def __init__(self, config, model):
        self.config = config
        self.funcname = config.funcname
        self.model = model
        self.model_wrap_cfg = CFGDenoiser(self)
        self.last_latent = None

    def sigmas(self, steps: int) -> torch.Tensor:
        predictor = self.model.forge_objects.unet.model.predictor
        t = predictor.schedule.timesteps(steps)
        return torch.cat([predictor.sigmas[t.long()], torch.zeros(1)])

    def initialize(self, p) -> dict:
        self.p = p
        denoiser = self.model_wrap_cfg
        denoiser.p = p
        denoiser.mask = getattr(p, "mask", None)
        denoiser.nmask = getattr(p, "nmask", None)
        denoiser.step = 0
        return {"cond_scale": p.cfg_scale, "s_min_uncond": 0.0}

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.sigmas(steps)
        extra = self.initialize(p)
        self.model_wrap_cfg.sigmas = sigmas
        x = x * sigmas[0]
        self.last_latent = x
        return self.launch_sampling(steps, lambda: self._loop(x, sigmas, conditioning, unconditional_conditioning,
                                                              image_conditioning, extra))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.sigmas(steps)[steps - t_enc - 1:]
        extra = self.initialize(p)
        self.model_wrap_cfg.sigmas = sigmas
        self.model_wrap_cfg.init_latent = x
        xi = x + noise * sigmas[0]
        self.last_latent = xi
        return self.launch_sampling(t_enc + 1, lambda: self._loop(xi, sigmas, conditioning, unconditional_conditioning,
                                                                  image_conditioning, extra))

    def _loop(self, x, sigmas, cond, uncond, image_cond, extra):
        model = self.model_wrap_cfg
        ones = x.new_ones(x.shape[0])

        def denoise(x_, sigma):
            return model(x_, sigma * ones, uncond, cond, extra["cond_scale"], extra["s_min_uncond"], image_cond)

        for i in range(len(sigmas) - 1):
            denoised = denoise(x, sigmas[i])
            d = (x - denoised) / sigmas[i]
            if self.funcname == "sample_heun" and sigmas[i + 1] > 0:
                x_trial = x + d * (sigmas[i + 1] - sigmas[i])
                d = (d + (x_trial - denoise(x_trial, sigmas[i + 1])) / sigmas[i + 1]) / 2
            x = x + d * (sigmas[i + 1] - sigmas[i])
            shared.state.sampling_step = i
        return x
