"""The CFG denoiser, like ``modules.sd_samplers_cfg_denoiser`` (written for these tests).

What the glue relies on: ``forward(x, sigma, uncond, cond, cond_scale, s_min_uncond,
image_cond)`` checks the interrupt flag first, builds one row per (cond, image) and
(uncond, image), asks ``self.inner_model`` for them (in one call, or per half when
``batch_cond_uncond`` is off or the lengths differ), skips uncond rows where NGMS or
1.10's early-CFG skip says so, combines them with CFG, blends the inpaint mask in after
and counts ``self.step``.
"""

from __future__ import annotations

import torch

from . import prompt_parser, sd_samplers_common, shared


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.p = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.calls: list[int] = []  # rows per inner-model call (what the tests look at)

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = self.create_wrap(shared.sd_model)
        return self.model_wrap

    def create_wrap(self, model):
        """The sampler family's wrapper of the model (sigma space or timesteps)."""
        raise NotImplementedError

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state, opts = shared.state, shared.opts
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if shared.features()["apply_refiner_takes_sigma"]:
            sd_samplers_common.apply_refiner(self, sigma)
        else:
            sd_samplers_common.apply_refiner(self)

        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch = len(conds_list)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([x[i:i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([sigma[i:i + 1].expand(n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([image_cond[i:i + 1].expand(n, *image_cond.shape[1:]) for i, n in enumerate(repeats)]
                                  + [image_cond])

        skip_uncond = False
        early = getattr(opts, "skip_early_cond", 0.0)
        if early and self.step / self.total_steps <= early:
            skip_uncond = True
        elif (self.step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in, sigma_in, image_cond_in = x_in[:-batch], sigma_in[:-batch], image_cond_in[:-batch]

        if opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            length = max(tensor.shape[1], uncond.shape[1])
            empty = shared.sd_model.cond_stage_model_empty_prompt

            def pad(c):
                missing = (length - c.shape[1]) // empty.shape[1]
                return torch.cat([c, empty.expand(c.shape[0], -1, -1).repeat(1, missing, 1)], dim=1) if missing else c

            tensor, uncond = pad(tensor), pad(uncond)

        def run(rows: slice, context: torch.Tensor) -> torch.Tensor:
            self.calls.append(context.shape[0])
            return self.inner_model(x_in[rows], sigma_in[rows],
                                    cond={"c_crossattn": [context], "c_concat": [image_cond_in[rows]]})

        n_cond = tensor.shape[0]
        if skip_uncond:
            x_out = run(slice(0, n_cond), tensor)
        elif tensor.shape[1] == uncond.shape[1] and opts.batch_cond_uncond:
            x_out = run(slice(0, None), torch.cat([tensor, uncond]))
        else:
            x_out = torch.cat([run(slice(0, n_cond), tensor), run(slice(n_cond, None), uncond)])

        if skip_uncond:
            x_out = torch.cat([x_out, x_out[[c[0][0] for c in conds_list]]])
        denoised_uncond = x_out[-batch:]
        scale = 1.0 if skip_uncond else cond_scale
        denoised = denoised_uncond.clone()
        for i, entries in enumerate(conds_list):
            for row, weight in entries:
                denoised[i] += (x_out[row] - denoised_uncond[i]) * (weight * scale)

        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.step += 1
        return denoised
