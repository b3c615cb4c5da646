"""Processing objects and the generation loop, as Forge Neo runs them (no VAE: latents out).

What the Neo glue relies on:
- the scripts' ``process`` runs before, and everything after it under
  ``torch.inference_mode()`` (conds, sampling, ``process_before_every_sampling``);
- the script runner logs and swallows exceptions of ``process`` and
  ``process_before_every_sampling`` (Neo's ``errors.report``);
- ``p.sd_model.forge_objects`` is reset from ``forge_objects_after_applying_lora`` before every
  sampling, and ``process_before_every_sampling`` runs after that reset: once before the first
  pass, **twice** before the hires pass (the first call's patcher edits are dropped by a reset
  in between), once in img2img;
- img2img with a mask blends the result with the original after sampling.
The caller closes ``p`` (the host's ``with closing(p)``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import prompt_parser, sd_samplers, shared


@dataclass(eq=False)
class StableDiffusionProcessing:
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
    denoising_strength: float = 0.75
    script_args: tuple = ()
    extra_generation_params: dict = field(default_factory=dict)
    closed: bool = False
    is_hr_pass: bool = False
    refiner_checkpoint: str | None = None  # the refiner switch (this fake never switches)
    scripts: Any = None

    def close(self) -> None:
        self.closed = True

    @property
    def sd_model(self) -> Any:
        return shared.sd_model

    def reset_forge_objects(self) -> None:
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()

    def sampling(self, c, uc, x, noise, sample) -> torch.Tensor:
        """One sampling as Neo runs it: reset, the scripts' pbes, the sampler."""
        self.reset_forge_objects()
        self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=c, uc=uc)
        return sample()


@dataclass(eq=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None
    hr_cfg: float | None = None

    def sample(self, c, uc, noise) -> torch.Tensor:
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        samples = self.sampling(c, uc, noise, noise, lambda: self.sampler.sample(
            self, noise, c, uc, image_conditioning=torch.zeros((noise.shape[0], 5, 1, 1))))
        if not self.enable_hr:
            return samples
        # the hires pass: the latent upscaled, its own conds, pbes twice with a reset between
        self.is_hr_pass = True
        self.hr_cfg = self.cfg_scale if self.hr_cfg is None else self.hr_cfg
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        self.hr_prompts, self.hr_negative_prompts = list(self.prompts), list(self.negative_prompts)
        samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        hires_steps = config.total_steps(self.hr_second_pass_steps or self.steps)
        model = self.sd_model
        size = {"width": self.hr_upscale_to_x, "height": self.hr_upscale_to_y}
        hr_c = prompt_parser.get_multicond_learned_conditioning(
            model, prompt_parser.SdConditioning(self.hr_prompts, **size), self.firstpass_steps, hires_steps)
        hr_uc = prompt_parser.get_learned_conditioning(
            model, prompt_parser.SdConditioning(self.hr_negative_prompts, is_negative_prompt=True, **size),
            self.firstpass_steps, hires_steps)
        noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(self.seed + 1000))
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=hr_c, uc=hr_uc)
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, model)
        return self.sampling(hr_c, hr_uc, samples, noise, lambda: self.sampler.sample_img2img(
            self, samples, noise, hr_c, hr_uc, steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=torch.zeros((noise.shape[0], 5, 1, 1))))


@dataclass(eq=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_latent: Any = None  # (1, 4, h, w): what the VAE would encode
    mask: Any = None  # latent-sized: 1 keeps the original, 0 repaints (``nmask`` is its complement)
    nmask: Any = None

    def sample(self, c, uc, noise) -> torch.Tensor:
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        init = self.init_latent.expand(noise.shape[0], -1, -1, -1).clone()
        samples = self.sampling(c, uc, init, noise, lambda: self.sampler.sample_img2img(
            self, init, noise, c, uc, image_conditioning=torch.zeros((noise.shape[0], 5, 1, 1))))
        if self.mask is not None:
            samples = samples * self.nmask + init * self.mask
        return samples


@dataclass
class Processed:
    images: list
    infotexts: list


class ScriptRunner:
    """The alwayson scripts of one generation, each given its own slice of ``p.script_args``
    (``args_from``/``args_to``); Neo reports and swallows what they raise."""

    def __init__(self, scripts: list):
        self.alwayson_scripts = scripts
        self.calls: dict[str, int] = {}

    def _run(self, name: str, p, *args, **kwargs) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        for script in self.alwayson_scripts:
            try:
                getattr(script, name)(p, *args, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:  # noqa: BLE001 - Neo's errors.report
                print(f"*** Error running {name}: {type(script).__name__}")
                traceback.print_exc()

    def process(self, p) -> None:
        self._run("process", p)

    def process_before_every_sampling(self, p, **kwargs) -> None:
        self._run("process_before_every_sampling", p, **kwargs)

    def postprocess(self, p, processed) -> None:
        self._run("postprocess", p, processed)


def process_images(p: StableDiffusionProcessing, scripts: list) -> Processed:
    """``scripts``: the alwayson scripts, in the order they run (each with ``args_from``/``args_to``)."""
    model = shared.sd_model
    p.scripts = ScriptRunner(scripts)
    p.firstpass_steps = sd_samplers.find_sampler_config(p.sampler_name).total_steps(p.steps)
    p.scripts.process(p)
    images = []
    with torch.inference_mode():
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted:
                break
            model.forge_objects = model.forge_objects_original.shallow_copy()
            p.prompts = [p.prompt] * p.batch_size
            p.negative_prompts = [p.negative_prompt] * p.batch_size
            p.is_hr_pass = False
            model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
            size = {"width": p.width, "height": p.height}  # SDXL's size conditioning
            c = prompt_parser.get_multicond_learned_conditioning(
                model, prompt_parser.SdConditioning(p.prompts, **size), p.firstpass_steps)
            uc = prompt_parser.get_learned_conditioning(
                model, prompt_parser.SdConditioning(p.negative_prompts, is_negative_prompt=True, **size), p.firstpass_steps)
            generator = torch.Generator().manual_seed(p.seed + n)
            noise = torch.randn((p.batch_size, 4, p.height // 8, p.width // 8), generator=generator)
            images.extend(p.sample(c, uc, noise))
    processed = Processed(images, [str(p.extra_generation_params)] * len(images))
    p.scripts.postprocess(p, processed)
    return processed
