"""Neo's CFG denoiser, as the glue relies on it (written for these tests).

``forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)`` checks the
interrupt flags, rebuilds the step's conds, and **in inpainting blends x with the noised
original before sampling** (``x = x * nmask + noised_init * mask``: a new tensor, not the
sampler's); then Neo's ``sampling_function`` (conditioning modifiers, cond/uncond batch,
unet function wrapper, CFG), the mask blend of the result, and ``self.step += 1``.
"""

from __future__ import annotations

import torch

from backend.sampling.sampling_function import sampling_function

from . import prompt_parser, sd_samplers_common, shared


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.p = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.sigmas = None

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = shared.state
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, cond_tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond_tensor = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask is not None:
            generator = torch.Generator().manual_seed(self.step)
            noise = torch.randn(self.init_latent.shape, generator=generator).to(self.init_latent)
            noisy_init = self.init_latent + noise * sigma.reshape(-1, 1, 1, 1)
            x = x * self.nmask + noisy_init * self.mask
        if getattr(self.p, "is_hr_pass", False):
            cond_scale = self.p.hr_cfg
        denoised = sampling_function(self, x, sigma, cond_tensor, uncond_tensor, cond_scale, self.sigmas, conds_list)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised
