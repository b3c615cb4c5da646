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

from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, LoRAUse, update_summary
from ..update import schedule_notes
from ..webui import host as webui
from ..webui import pipeline, samplers
from ..webui.pipeline import Generations, GenerationState, controlnet_message, refused
from ..webui.plan import (
    ChunkedTokenizer,
    CLoRARuntimeError,
    ProxyRows,
    check_single_conds,
    condition_parts,
    fused_step,
    pick_segment,
    plan_variants,
    token_map_schedule,
)
from ..webui.settings import row_cap
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
    """One sampling (one batch, first pass or hires) on a Forge host."""

    def __init__(self, generation: Generation):
        p = generation.p
        self.generation = generation
        args = generation.args
        facts = webui.pass_facts(p)
        self.hires = facts.hires
        composition = args.composition()
        try:
            self.plan = plan_variants(composition, facts.prompts, facts.negatives)
        except ValueError as e:
            raise CLoRARuntimeError(f"CLoRA: {e}") from None
        family = host.model_family(p)
        if family not in host.SUPPORTED_FAMILIES:
            names = [FAMILY_NAMES[f] for f in host.SUPPORTED_FAMILIES]
            raise CLoRARuntimeError(f"CLoRA on {host.host_name()} runs {' and '.join(names)} checkpoints (not inpainting "
                                    f"or refiner ones); this checkpoint is {family}. Load an {' or '.join(names)} "
                                    "checkpoint or turn CLoRA off")
        self.loras = {c.lora: lora_bridge.load(c.lora, p) for c in args.concepts}
        self.conds = _encode(p, self.plan, self.loras, facts)
        self.cond_ends = [[end for end, _ in conds] for conds in self.conds]
        tokenizer = ChunkedTokenizer(host.prompt_chunker(p))
        self.token_maps = []
        for variants in self.plan.variants:
            schedules = host.prompt_schedules([v.prompt for v in variants], facts.steps, facts.hires_steps)
            self.token_maps.append(token_map_schedule(composition, variants, tokenizer, schedules))
        self.images = len(facts.prompts)
        self.rows = ProxyRows(self.images, self.plan.n_variants)
        sampler = samplers.support(host.sampler_function(p))
        self.updates = not self.hires and sampler.updates
        if self.hires:
            generation.note("hires pass: masks and routing only, no latent updates")
        elif not self.updates:
            generation.note(f"sampler {facts.sampler_name!r} {sampler.reason}: masks and fusion only, no latent updates")
        self.patcher = host.install_patcher(p, self.wrapper, self.modifier)
        unet = host.diffusion_model(self.patcher)
        param = next(unet.parameters())
        deltas = {name: lora_bridge.on_device(lora.unet, param.device, param.dtype) for name, lora in self.loras.items()}
        variant_loras = [[LoRAUse(name, deltas[name], weight) for name, weight in lora_set]
                         for lora_set in self.plan.unet_loras]
        hooks = EngineHooks(on_refine=_on_refine, interrupted=webui.interrupted, warn=generation.note)
        self.engine = CLoRAEngine(unet, variant_loras, self.token_maps[0][0][1], args.engine_settings(), hooks,
                                  functional_gradient=True)
        self.engine.max_rows = row_cap(self.images * self.plan.n_variants)
        self.engine.__enter__()
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        self._stops = [block.register_forward_pre_hook(_stop_if_interrupted) for block in blocks]
        self._fused: torch.Tensor | None = None
        self._noted_schedule = False
        self._sampler_x: torch.Tensor | None = None
        self._watch = host.watch_sampler_latent(p, self._keep_sampler_x)

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
        if host.controlnet_active(self.generation.p):
            raise CLoRARuntimeError(controlnet_message("ControlNet is active for this generation"))
        if x.shape[0] != self.images:
            raise CLoRARuntimeError(f"CLoRA: the sampler runs {x.shape[0]} rows for {self.images} images; "
                                    "another extension changes the batch")
        step, total = host.step_and_total(self.generation.p, model_options, sigma)
        if self.updates and not self._noted_schedule:
            self._noted_schedule = True
            for message in schedule_notes(self.generation.args.engine_settings().schedule, total, None,
                                          len(self.plan.composition.content)):
                self.generation.note(message)
        maps = [segments[pick_segment([e for e, _ in segments], step)][1] for segments in self.token_maps]
        generation = self.generation
        previews = not self.hires and generation.args.previews
        iteration = webui.batch_iteration(generation.p)

        def on_group(group: list[int], out: Any) -> None:
            generation.previews.record(iteration, group, out, maps[group[0]], self.plan)

        def inner(x_rows: torch.Tensor, sigma_rows: torch.Tensor, cond: dict) -> torch.Tensor:
            context, vector = condition_parts(cond)  # SDXL: each row's own vector, as the host's ``y``
            return host.apply_model(model, model_options, x_rows, sigma_rows, context, vector)

        image_cond = x.new_zeros((x.shape[0], 1, 1, 1))  # no concat conditioning: inpainting checkpoints are refused
        # inpainting: the update acts inside the inpaint mask only (the host's blend keeps the rest), and
        # the host hands the modifier a blended copy of the sampler's x, so the update is carried over to it
        region = host.inpaint_region(self.generation.p)
        sampler_x = self._sampler_x
        carry = region is not None and sampler_x is not None and sampler_x is not x and self.updates
        before = x.clone() if carry else None
        with webui.progress_text_kept():
            fused = fused_step(self.engine, inner, self.rows, x, sigma, image_cond, self._cond_table(step), maps,
                               step, total, host.is_k_diffusion(self.generation.p), self.updates,
                               on_group if previews else None, update_region=region)
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

    def _cond_table(self, step: int) -> ConditioningTable:
        plan = self.plan
        rows = []
        for jobs in (plan.cond_job, plan.uncond_job):
            for v in range(plan.n_variants):
                for image in range(len(jobs)):
                    j = jobs[image][v]
                    rows.append(self.conds[j][pick_segment(self.cond_ends[j], step)][1])
        return ConditioningTable(rows)

    def close(self) -> None:
        if self.engine is None:
            return
        self.engine.close()
        for handle in self._stops:
            handle.remove()
        if self._watch is not None:
            self._watch.remove()
        self._sampler_x = None
        records = self.engine.records
        updated = sum(1 for r in records if r.iterations)
        if updated:
            print(f"CLoRA: {len(records)} model steps, {sum(r.iterations for r in records)} latent updates in {updated} steps")
            for line in update_summary(records):
                print(f"CLoRA: {line}")
        self.engine = None
        self._fused = None


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


def _on_refine(i: int, n: int) -> None:
    webui.set_progress_text(f"CLoRA refine {i}/{n}")


def _stop_if_interrupted(module: Any, args: Any) -> None:
    if webui.interrupted():
        host.raise_interrupted()
