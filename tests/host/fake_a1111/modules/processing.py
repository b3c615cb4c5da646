"""Processing objects and the generation loop, like ``modules.processing`` (no VAE: latents out).

``process_images(p, scripts)`` runs what the glue sees of a generation: each script's
``process``, then per batch the conds, the sampler and each script's ``postprocess``
at the end; the caller closes ``p`` (the host's ``with closing(p)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import prompt_parser, sd_samplers, shared


@dataclass(eq=False)
class StableDiffusionProcessing:
    cached_c: ClassVar[list] = [None, None]  # the host's prompt cache, shared by all p
    cached_uc: ClassVar[list] = [None, None]
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 6
    cfg_scale: float = 5.0
    width: int = 64
    height: int = 64
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "Euler"
    script_args: tuple = ()
    extra_generation_params: dict = field(default_factory=dict)
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass(eq=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_c: ClassVar[list] = [None, None]
    cached_hr_uc: ClassVar[list] = [None, None]
    enable_hr: bool = False


@dataclass(eq=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_latent: Any = None  # (1, 4, h, w): what the VAE would encode
    denoising_strength: float = 0.75
    mask: Any = None  # latent-sized: 1 keeps the original, 0 repaints (``nmask`` is its complement)
    nmask: Any = None


@dataclass
class Processed:
    images: list
    infotexts: list


def process_images(p: StableDiffusionProcessing, scripts: list) -> Processed:
    model = shared.sd_model
    for script in scripts:
        script.process(p, *p.script_args)
    config = sd_samplers.find_sampler_config(p.sampler_name)
    p.firstpass_steps = config.total_steps(p.steps)
    images = []
    for n in range(p.n_iter):
        p.iteration = n
        p.prompts = [p.prompt] * p.batch_size
        p.negative_prompts = [p.negative_prompt] * p.batch_size
        c = prompt_parser.get_multicond_learned_conditioning(model, p.prompts, p.firstpass_steps)
        uc = prompt_parser.get_learned_conditioning(model, p.negative_prompts, p.firstpass_steps)
        p.c, p.uc = c, uc
        sampler = sd_samplers.create_sampler(p.sampler_name, model)
        p.sampler = sampler
        generator = torch.Generator().manual_seed(p.seed + n)
        h, w = p.height // 8, p.width // 8
        noise = torch.randn((p.batch_size, 4, h, w), generator=generator)
        image_cond = torch.zeros((p.batch_size, 5, 1, 1))
        if isinstance(p, StableDiffusionProcessingImg2Img):
            x = p.init_latent.expand(p.batch_size, -1, -1, -1).clone()
            samples = sampler.sample_img2img(p, x, noise, c, uc, image_conditioning=image_cond)
            if p.mask is not None:  # the host pastes the kept area back
                samples = samples * p.nmask + x * p.mask
        else:
            samples = sampler.sample(p, noise, c, uc, image_conditioning=image_cond)
        images.extend(samples)
    processed = Processed(images, [str(p.extra_generation_params)] * len(images))
    for script in scripts:
        script.postprocess(p, processed, *p.script_args)
    return processed
