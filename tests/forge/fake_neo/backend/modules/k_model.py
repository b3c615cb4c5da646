"""``KModel``: the diffusion model behind an eps predictor in sigma space.

``apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **extra)`` takes the
sampler's x (= x_t / sqrt(abar)) and sigma ``t``, feeds the UNet x / sqrt(sigma^2 + 1) and
the timestep of sigma, and returns the denoised x0 = x - sigma * eps. Extra conds (SDXL's
vector ``y``) go on to the UNet as keywords, as Neo's do. The diffusion model
is eval, ``requires_grad_(False)`` (Neo; lllyasviel Forge 2.x's KModel leaves ``requires_grad``
as it is: ``requires_grad_off=False``), and its weights are inference tensors (``world.py``
loads them under ``torch.inference_mode()``, as Neo's loader does).
"""

from __future__ import annotations

import torch


class Predictor:
    def __init__(self, schedule):
        self.schedule = schedule
        self.sigmas = schedule.sigmas.float()

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma.float())

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - model_output * sigma.reshape(-1, 1, 1, 1)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise=False):
        return latent + noise * sigma.reshape(-1, 1, 1, 1)


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model: torch.nn.Module, schedule, requires_grad_off: bool = True):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.diffusion_model.eval()
        if requires_grad_off:
            self.diffusion_model.requires_grad_(False)
        self.predictor = Predictor(schedule)
        self.calls: list[int] = []  # rows per call (what the tests look at)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        self.calls.append(x.shape[0])
        out = self.diffusion_model(xc, self.predictor.timestep(sigma), context=c_crossattn, **kwargs).float()
        return self.predictor.calculate_denoised(sigma, out, x)
