"""The CLoRA generation lifecycle on the Forge ``backend`` family (Forge Neo, lllyasviel Forge 2.x),
through the host's own extension points (host-facing; the hosts' differences are decided in ``host``).

- ``begin`` (the script's ``process``): parse the arguments (the shared parameter model), check
  the LoRAs, open the generation. As on A1111, an error cannot be raised there (the host logs
  and swallows script exceptions); the generation carries it and its first model call fails
  the request with 422.
- ``before_sampling`` (the script's ``process_before_every_sampling``): a pass is built for
  this sampling: variant plan, LoRA deltas (the host's loader), variant encodings (each with its
  LoRAs' CLIP patches on a clone of the CLIP patcher), token maps, and a *clone* of the
  pass's UnetPatcher with
  * a conditioning modifier, which receives the sampler's own x: it runs ``fused_step`` (the
    shared A1111 step: latent update in place at scheduled steps through the engine's
    functional gradient, one batched call over every variant row through
    ``KModel.apply_model``, masks, fusion) and keeps the fused rows;
  * a unet function wrapper, which serves those fused rows to the host in its own row order
    (``cond_or_uncond``), so the host's CFG, callbacks and previews stay its own.
  The clone is put back on ``p.sd_model.forge_objects`` and dies with the sampling (the host
  resets ``forge_objects`` before every sampling): nothing to undo in the host's patchers.
  Hooks on the diffusion model's modules (map capture, per-row routing, interrupt checks)
  are taken off when the pass closes (next pass, sampling error, or the host closing ``p``).

SD1.x and SDXL checkpoints run. SDXL's conds are the host's dicts (``crossattn``, and ``vector``:
the pooled clip_g embedding with the size embeddings); each variant row goes to ``KModel.apply_model``
with its own context and its own vector as ``y``, as the host's conds pass it. Other checkpoints
(not in ``host.SUPPORTED_FAMILIES``: SD2, Flux, ..., the SDXL refiner, inpainting checkpoints) and
the refiner switch are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..webui import passes, pipeline
from ..webui.passes import PassFacts
from ..webui.pipeline import Generations, GenerationState, WebUIPort, controlnet_message, refused
from ..webui.plan import ChunkedTokenizer, CLoRARuntimeError, VariantPlan, check_single_conds, condition_parts
from ..webui.samplers import SamplerSupport
from . import host, lora_bridge


FAMILY_NAMES = {"SD1": "SD1.x", "SDXL": "SDXL"}  # host.model_family's names, as messages say them


def begin(p: Any, args: Sequence[Any]) -> None:
    """The script's ``process`` (``pipeline.begin``); the Forge family's own refusals come with each pass."""
    pipeline.begin(generations, p, args)


def before_sampling(p: Any) -> None:
    """``process_before_every_sampling``: set up this sampling's pass (nothing when CLoRA is off)."""
    generation = generations.serving(p)
    if generation is None:
        return
    generation.start_pass()


def previews_of(p: Any) -> list:
    return pipeline.previews_of(generations, p)


generations = Generations(lambda p, args, error: Generation(p, args, error))


class Generation(GenerationState):
    """The Forge generation: each sampling gets a pass through the host's patcher (``start_pass``)."""

    def start_pass(self) -> None:
        self.close_pass()
        if self.error is not None:  # fail the request at the first model call (pbes errors are swallowed)
            host.install_patcher(self.p, _passthrough, self._refuse)
            return
        try:
            self._pass = Pass(self)
        except Exception as e:  # noqa: BLE001 - the host would log it and sample without CLoRA
            # a request that asked for CLoRA never runs without it: its first model call fails
            # (422 for CLoRA's own refusals, the error itself otherwise)
            self.error = e
            host.install_patcher(self.p, _passthrough, self._refuse)

    def _refuse(self, *args: Any) -> tuple:
        raise refused(self.error, host.host_label())


def _passthrough(apply_model: Any, args: dict) -> torch.Tensor:
    return apply_model(args["input"], args["timestep"], **args["c"])


class Pass:
    """One sampling (one batch, first pass or hires) on a Forge host: the shared ``passes.Pass``,
    hooked into the host's sampling through a clone of its UnetPatcher (``modifier``, ``wrapper``)."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self._fused: torch.Tensor | None = None
        self._sampler_x: torch.Tensor | None = None
        self._watch: Any = None
        self.core = passes.Pass(generation, Port(generation.p, self))
        self.images = self.core.images
        self._watch = host.watch_sampler_latent(generation.p, self._keep_sampler_x)

    def _keep_sampler_x(self, x: torch.Tensor) -> None:
        self._sampler_x = x

    # -- the conditioning modifier: the sampler's x, before the host's cond/uncond batch ----------
    def modifier(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        try:
            with host.gradient_mode():
                self._fused = self._step(model, x, timestep, model_options, cond)
        except BaseException as e:
            self.generation.close_pass()
            answer = refused(e, host.host_label())
            if answer is e:
                raise
            raise answer from None
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _step(self, model: Any, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, cond: list | None
              ) -> torch.Tensor:
        # the host's conds: one entry per AND sub-prompt (each with the rows of every image)
        check_single_conds([len(cond)] if cond else [])
        p = self.generation.p
        if host.controlnet_active(p):
            raise CLoRARuntimeError(controlnet_message("ControlNet is active for this generation"))
        if x.shape[0] != self.images:
            raise CLoRARuntimeError(f"CLoRA: the sampler runs {x.shape[0]} rows for {self.images} images; "
                                    "another extension changes the batch")
        step, total = host.step_and_total(p, model_options, sigma)

        def inner(x_rows: torch.Tensor, sigma_rows: torch.Tensor, cond: dict) -> torch.Tensor:
            context, vector = condition_parts(cond)  # SDXL: each row's own vector, as the host's ``y``
            return host.apply_model(model, model_options, x_rows, sigma_rows, context, vector)

        image_cond = x.new_zeros((x.shape[0], 1, 1, 1))  # no concat conditioning: inpainting checkpoints are refused
        # inpainting: the update acts inside the inpaint mask only (the host's blend keeps the rest), and
        # the host hands the modifier a blended copy of the sampler's x, so the update is carried over to it
        region = host.inpaint_region(p)
        sampler_x = self._sampler_x
        carry = region is not None and sampler_x is not None and sampler_x is not x and self.core.updates
        before = x.clone() if carry else None
        fused = self.core.step(inner, x, sigma, image_cond, step, total, host.is_k_diffusion(p), region)
        if carry:
            sampler_x.add_((x - before).to(sampler_x.dtype))
        return fused

    # -- the unet function wrapper: serve the fused rows in the host's row order ------------------
    def wrapper(self, apply_model: Any, args: dict) -> torch.Tensor:
        x, chunks = args["input"], args["cond_or_uncond"]
        fused = self._fused
        if fused is None or x.shape[0] != len(chunks) * self.images:
            self.generation.close_pass()
            raise refused(CLoRARuntimeError("CLoRA: the host called the UNet with rows CLoRA did not prepare; "
                                            "another extension changes the batch"), host.host_label())
        b = self.images
        return torch.cat([fused[:b] if c == 0 else fused[b:] for c in chunks]).to(x.dtype)

    def close(self) -> None:
        self.core.close()
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        self._sampler_x = None
        self._fused = None


class Port(WebUIPort):
    """The Forge family's side of one sampling pass (``passes.PassPort``): the host's LoRA loader and
    CLIP patcher, its chunker and prompt schedules, and a clone of its UnetPatcher carrying ``sampling``'s
    hooks. Sampling runs in inference mode, so the gradient passes are functional (torch.func)."""

    functional_gradient = True

    def __init__(self, p: Any, sampling: Pass):
        super().__init__(p)
        self.sampling = sampling

    def check_model(self) -> None:
        family = host.model_family(self.p)
        if family not in host.SUPPORTED_FAMILIES:
            names = [FAMILY_NAMES[f] for f in host.SUPPORTED_FAMILIES]
            raise CLoRARuntimeError(f"CLoRA on {host.host_name()} runs {' and '.join(names)} checkpoints (not inpainting "
                                    f"or refiner ones); this checkpoint is {family}. Load an {' or '.join(names)} "
                                    "checkpoint or turn CLoRA off")

    def load_lora(self, name: str) -> lora_bridge.ForgeLoRA:
        return lora_bridge.load(name, self.p)

    def encode(self, plan: VariantPlan, loras: dict, facts: PassFacts) -> list[list[tuple[int, Any]]]:
        return _encode(self.p, plan, loras, facts)

    def tokenizer(self) -> ChunkedTokenizer:
        return ChunkedTokenizer(host.prompt_chunker(self.p))

    def prompt_schedules(self, texts: list[str], facts: PassFacts) -> list[list[tuple[int, str]]]:
        return host.prompt_schedules(texts, facts.steps, facts.hires_steps)

    def sampler_function(self) -> str | None:
        return host.sampler_function(self.p)

    def model_calls(self, total_steps: int, sampler: SamplerSupport) -> int | None:
        return None  # the host counts the model calls it makes (``step_and_total``)

    def attach(self) -> torch.nn.Module:
        patcher = host.install_patcher(self.p, self.sampling.wrapper, self.sampling.modifier)
        return host.diffusion_model(patcher)

    def pad_cond(self) -> torch.Tensor | None:
        return None  # the host's own batching pads what it runs together

    def raise_interrupted(self) -> None:
        host.raise_interrupted()


def _encode(p: Any, plan: Any, loras: dict, facts: Any) -> list[list[Any]]:
    """[(end_at_step, cond)] of every job of ``plan``: each LoRA set's CLIP patches on a clone of the CLIP patcher."""
    results: dict[int, list] = {}
    for (lora_set, negative), indices in plan.jobs_by_lora_set().items():
        patches = [(loras[name].clip, weight) for name, weight in lora_set if loras[name].clip]
        tag = "clora:" + ",".join(f"{loras[name].path}@{weight}" for name, weight in lora_set)
        with host.text_encoder_patches(p, tag, patches):
            conds = host.learned_conditioning(p, [plan.jobs[i].text for i in indices], negative, facts.steps,
                                              facts.hires_steps, facts.width, facts.height)
        for i, cond in zip(indices, conds):
            results[i] = cond
    return [results[i] for i in range(len(plan.jobs))]
