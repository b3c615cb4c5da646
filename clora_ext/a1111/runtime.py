"""Sampling-time hook: a CFGDenoiser.forward wrapper and a proxy for its inner model (host-facing).

``install()`` wraps ``CFGDenoiser.forward`` once. Without an open CLoRA generation
for the denoiser's ``p`` the wrapper calls the original with the very same arguments.
With one, each call:

1. runs ``CLoRAEngine.step`` on the sampler's own ``x``: every image is expanded
   into its variants (base prompt + one per content LoRA), cond and uncond, in one
   batch; each LoRA is routed to its rows; maps are captured; the latent is updated
   in place at scheduled steps (first-order samplers, first pass only); the rows
   are fused with the masks back to one cond and one uncond row per image;
2. swaps the denoiser's inner model for a proxy that serves those fused rows in the
   host's row order, and lets the host's own forward run (its callbacks, CFG,
   previews and step counting stay the host's). The proxy serves consecutive row
   ranges, so the host may split the batch (``batch_cond_uncond`` off, uneven
   cond/uncond lengths) or drop uncond rows (NGMS) as it likes.

The fused rows are computed from the prompts and latent the host handed to the
forward; a ``cfg_denoiser`` callback that edits ``x_in`` or the conds is not seen.
In img2img the schedule counts the steps that run at the denoising strength (the
host's ``total_steps``); in inpainting the latent update acts inside the inpaint
mask only, and the host's own blend keeps the rest of the image.

The generation lifecycle is the shared one (``webui.pipeline``): ``begin`` (the script's
``process``) opens a generation, closed when the host closes ``p``. A pass (one batch's
sampling) takes its hooks off the model when sampling raises, when the next pass starts, or
when its generation closes. Every access to the host goes through ``host`` (A1111's own) or
``webui.host`` (what every web UI host shares).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any, Callable, Sequence

import torch

from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, LoRAUse, update_summary
from ..update import schedule_notes
from ..webui import host as webui
from ..webui import pipeline, samplers
from ..webui.pipeline import Generations, GenerationState, controlnet_message, refused
from ..webui.plan import (
    CLoRARuntimeError,
    FusedProxy,
    ProxyRows,
    check_single_conds,
    fused_step,
    pick_segment,
    plan_variants,
    token_map_schedule,
)
from ..webui.settings import row_cap
from . import encoding, host, lora_bridge


def install() -> None:
    """Wrap CFGDenoiser.forward (idempotent): a denoiser whose ``p`` has no open generation runs
    the host's forward with the very same arguments."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            generation = generations.serving(host.denoiser_p(self))
            if generation is None:
                return original(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
            return generation.forward(original, self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

        return forward

    host.wrap_denoiser_forward(make, __name__)


def begin(p: Any, args: Sequence[Any]) -> None:
    """The script's ``process`` (``pipeline.begin``) with A1111's own refusals."""
    pipeline.begin(generations, p, args, check_host)


def previews_of(p: Any) -> list:
    return pipeline.previews_of(generations, p)


def check_host(p: Any) -> None:
    """Refuse host setups whose UNet is not the ldm/sgm module CLoRA hooks into."""
    label = host.replaced_unet_label()  # a replaced UNet (TensorRT, ...) never runs our layers
    if label is not None:
        raise CLoRARuntimeError(
            f"CLoRA: the UNet is replaced by {label!r} (e.g. TensorRT); set Settings > SD UNet to None to use CLoRA"
        )


generations = Generations(lambda p, args, error: Generation(p, args, error))


class Generation(GenerationState):
    """The A1111 generation: its passes run inside the host's CFG denoiser (``forward``)."""

    def forward(self, original, denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.error is not None:
            raise refused(self.error, host.host_label())
        if webui.interrupted():  # the host's forward raises InterruptedException
            return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        try:
            if host.controlnet_marked(cond):  # hooked by ControlNet without an enabled unit in its args
                raise CLoRARuntimeError(controlnet_message("ControlNet is active for this generation"))
            if self._pass is None or not self._pass.serves(denoiser):
                self.close_pass()
                self._pass = Pass(self, denoiser, cond)
            fused = self._pass.step(denoiser, x, sigma, image_cond)
            proxy = FusedProxy(host.inner_model(denoiser), fused, self._pass.rows)
            with host.inner_model_replaced(denoiser, proxy):
                return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        except BaseException as e:  # sampling ends here: take the hooks off the model now
            self.close_pass()
            answer = refused(e, host.host_label())
            if answer is e:
                raise
            raise answer from None

    def close(self) -> None:
        super().close()
        host.forget_cached_conds(self.p)


class Pass:
    """One sampling pass (one batch, first pass or hires): its variants, conds, token maps and engine."""

    def __init__(self, generation: Generation, denoiser: Any, cond: Any):
        p = generation.p
        self.generation = generation
        self.denoiser = denoiser
        self.model = host.sd_model()
        facts = webui.pass_facts(p)
        self.hires = facts.hires
        if host.is_unclip(self.model):
            raise CLoRARuntimeError("CLoRA does not support unCLIP checkpoints")
        if host.is_edit_model(self.model):
            raise CLoRARuntimeError("CLoRA does not support instruct-pix2pix (edit) checkpoints")
        check_single_conds(host.subprompt_counts(cond))
        args = generation.args
        composition = args.composition()
        try:
            self.plan = plan_variants(composition, facts.prompts, facts.negatives)
        except ValueError as e:
            raise CLoRARuntimeError(f"CLoRA: {e}") from None
        self.loras = {c.lora: lora_bridge.load(c.lora) for c in args.concepts}
        schedule = encoding.Schedule(facts.steps, facts.hires_steps, facts.width, facts.height)
        self.conds = encoding.encode(self.plan, self.loras, schedule)
        self.cond_ends = [[end for end, _ in conds] for conds in self.conds]
        tokenizer = encoding.host_tokenizer()
        self.token_maps = []
        for variants in self.plan.variants:
            schedules = schedule.prompt_schedules([v.prompt for v in variants])
            self.token_maps.append(token_map_schedule(composition, variants, tokenizer, schedules))
        self.rows = ProxyRows(len(facts.prompts), self.plan.n_variants)
        self.sigma_space = host.sigma_space(denoiser)
        sampler = samplers.support(host.sampler_function(denoiser))
        self.updates = not self.hires and sampler.updates
        if self.hires:
            generation.note("hires pass: masks and routing only, no latent updates")
        elif not self.updates:
            generation.note(f"sampler {facts.sampler_name!r} {sampler.reason}: masks and fusion only, no latent updates")
        else:
            steps = host.denoiser_total_steps(denoiser)
            calls = steps - 1 if sampler.one_step_fewer else None
            for message in schedule_notes(args.engine_settings().schedule, steps, calls, len(composition.content)):
                generation.note(message)
        unet = host.unet(self.model)
        # this pass's device copies of the cached (CPU) deltas: gone with the pass
        param = next(unet.parameters())
        unet_deltas = {name: lora_bridge.on_device(lora.unet, param.device, param.dtype) for name, lora in self.loras.items()}
        variant_loras = [
            [LoRAUse(name, unet_deltas[name], weight) for name, weight in lora_set] for lora_set in self.plan.unet_loras
        ]
        hooks = EngineHooks(on_refine=_on_refine, interrupted=webui.interrupted, warn=generation.note)
        self.engine = CLoRAEngine(unet, variant_loras, self.token_maps[0][0][1], args.engine_settings(), hooks)
        self.engine.max_rows = row_cap(len(facts.prompts) * self.plan.n_variants)
        self.engine.__enter__()
        # Interrupt/Skip stop a (gradient) UNet pass between blocks, not only between passes
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        self._stops = [block.register_forward_pre_hook(_stop_if_interrupted) for block in blocks]

    def serves(self, denoiser: Any) -> bool:
        return denoiser is self.denoiser and host.sd_model() is self.model

    def _cond_table(self, step: int) -> ConditioningTable:
        """Conds of every (uncond, variant, image) row at ``step``, stacked in ProxyRows.table_index order."""
        plan = self.plan
        rows = []
        for jobs in (plan.cond_job, plan.uncond_job):
            for v in range(plan.n_variants):
                for image in range(len(jobs)):
                    j = jobs[image][v]
                    rows.append(self.conds[j][pick_segment(self.cond_ends[j], step)][1])
        # the host runs cond and uncond at their own lengths unless told to pad them
        return ConditioningTable(rows, host.empty_prompt_cond(self.model) if host.pads_cond_uncond() else None)

    def step(self, denoiser: Any, x: torch.Tensor, sigma: torch.Tensor, image_cond: torch.Tensor) -> torch.Tensor:
        step = host.denoiser_step(denoiser)
        maps = [segments[pick_segment([e for e, _ in segments], step)][1] for segments in self.token_maps]
        generation = self.generation
        previews = not self.hires and generation.args.previews
        iteration = webui.batch_iteration(generation.p)

        def on_group(group: list[int], out: Any) -> None:
            generation.previews.record(iteration, group, out, maps[group[0]], self.plan)

        with webui.progress_text_kept():
            return fused_step(
                self.engine, host.inner_model(denoiser), self.rows, x, sigma, image_cond, self._cond_table(step), maps,
                step, host.denoiser_total_steps(denoiser), self.sigma_space, self.updates,
                on_group if previews else None, update_region=host.inpaint_region(denoiser),
            )

    def close(self) -> None:
        self.engine.close()
        for handle in self._stops:
            handle.remove()
        records = self.engine.records
        updated = sum(1 for r in records if r.iterations)
        if updated:  # did the updates lower the contrastive loss? per image, before and after at the same step
            print(f"CLoRA: {len(records)} model steps, {sum(r.iterations for r in records)} latent updates in {updated} steps")
            for line in update_summary(records):
                print(f"CLoRA: {line}")
        # the engine's hooks point back at this pass: break the cycle so that this pass's device
        # copies of the LoRAs are freed now, not at the next full garbage collection
        self.engine = None
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the pass's freed CPU buffers back to the OS (glibc keeps them in its heap otherwise,
    so the server's RSS would only ever grow by each generation's peak)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
            pass


def _on_refine(i: int, n: int) -> None:
    webui.set_progress_text(f"CLoRA refine {i}/{n}")


def _stop_if_interrupted(module: Any, args: Any) -> None:
    if webui.interrupted():
        host.raise_interrupted()
