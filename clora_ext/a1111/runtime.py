"""Sampling-time hook: a CFGDenoiser.forward wrapper and a proxy for its inner model (host-facing).

``install()`` wraps ``CFGDenoiser.forward`` once. Without an active CLoRA run for
the denoiser's ``p`` the wrapper calls the original with the very same arguments.
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
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from typing import Any

import torch
from fastapi.exceptions import HTTPException

from modules import patches, sd_samplers, sd_samplers_cfg_denoiser, sd_samplers_common, sd_samplers_kdiffusion, shared
from modules.shared import state

from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, LoRAUse, update_summary
from ..update import schedule_notes
from . import encoding, infotext, lora_bridge, samplers
from .params import CLoRAArgs, CLoRAArgsError
from .plan import (
    CLoRARuntimeError,
    FusedProxy,
    ProxyRows,
    check_single_conds,
    fused_step,
    pick_segment,
    plan_variants,
    token_map_schedule,
)
from .previews import PreviewStore

_active: "Run | None" = None


class RequestRefused(HTTPException):
    """A request CLoRA cannot run, as the host's API answers it: 422 with the message.

    An HTTPException, because the host prints a full backtrace in its console for any
    other exception; the message is printed here once instead.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def refused(error: Exception) -> Exception:
    """The host-facing form of a CLoRA error (others pass unchanged)."""
    if isinstance(error, (CLoRARuntimeError, CLoRAArgsError)):
        message = str(error) if str(error).startswith("CLoRA") else f"CLoRA: {error}"
        print(f"{message} (request refused)")
        return RequestRefused(message)
    return error


def install() -> None:
    """Wrap CFGDenoiser.forward (idempotent)."""
    cls = sd_samplers_cfg_denoiser.CFGDenoiser
    if getattr(cls.forward, "__clora__", False):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        run = _active
        if run is None or run.p is not getattr(self, "p", None):
            return original(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        return run.forward(original, self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

    forward.__clora__ = True
    patches.patch(__name__, cls, "forward", forward)


def check_host() -> None:
    """Refuse host setups whose UNet is not the ldm/sgm module CLoRA hooks into."""
    if importlib.util.find_spec("modules_forge") is not None:
        raise CLoRARuntimeError("CLoRA: the Forge backend is not supported; CLoRA runs on AUTOMATIC1111 1.x")
    from modules import sd_unet  # a replaced UNet (TensorRT, ...) never runs our layers

    if sd_unet.current_unet is not None:
        label = getattr(getattr(sd_unet.current_unet, "option", None), "label", "another UNet")
        raise CLoRARuntimeError(
            f"CLoRA: the UNet is replaced by {label!r} (e.g. TensorRT); set Settings > SD UNet to None to use CLoRA"
        )


def start(p: Any, args: CLoRAArgs | None, error: Exception | None = None) -> "Run":
    """Make ``p`` a CLoRA generation; a pending ``error`` fails it at its first model call."""
    global _active
    reset()
    _active = Run(p, args, error)
    _finish_on_close(p)
    return _active


def _finish_on_close(p: Any) -> None:
    """The host closes ``p`` even when sampling raised (``with closing(p)``): end the run there too."""
    close = p.close

    def close_and_finish() -> None:
        try:
            finish(p)
        finally:
            close()

    p.close = close_and_finish


def finish(p: Any) -> "Run | None":
    """End the run of ``p`` (if any) and return it."""
    global _active
    run = _active
    if run is None or run.p is not p:
        return None
    run.close()
    _active = None
    return run


def reset() -> None:
    """Close whatever a failed generation left behind (idempotent)."""
    global _active
    if _active is not None:
        _active.close()
    _active = None


class Run:
    """One CLoRA generation (all batches, both passes)."""

    def __init__(self, p: Any, args: CLoRAArgs | None, error: Exception | None):
        self.p = p
        self.args = args
        self.error = error
        self.notes: list[str] = []
        self.previews = PreviewStore()
        self._pass: Pass | None = None

    def note(self, message: str) -> None:
        """Said once in the console and recorded in the infotext entry."""
        message = message.removeprefix("CLoRA: ")
        if message in self.notes:
            return
        self.notes.append(message)
        print(f"CLoRA: {message}")
        self.p.extra_generation_params[infotext.KEY] = infotext.dump(self.args, self.notes)

    def forward(self, original, denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.error is not None:
            raise refused(self.error)
        if state.interrupted or state.skipped:  # the host's forward raises InterruptedException
            return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        try:
            if self._pass is None or not self._pass.serves(denoiser):
                self._close_pass()
                self._pass = Pass(self, denoiser, cond)
            fused = self._pass.step(denoiser, x, sigma, image_cond)
        except (CLoRARuntimeError, CLoRAArgsError) as e:
            self._close_pass()
            raise refused(e) from None
        except BaseException:
            self._close_pass()
            raise
        inner = denoiser.inner_model
        proxy = FusedProxy(inner, fused, self._pass.rows)
        denoiser.model_wrap = proxy
        try:
            return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        except BaseException:  # sampling ends here: take the hooks off the model now
            self._close_pass()
            raise
        finally:
            # the SDXL refiner switch replaces the wrapper inside the host's forward: keep the host's
            if denoiser.model_wrap is proxy:
                denoiser.model_wrap = inner

    def _close_pass(self) -> None:
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def close(self) -> None:
        self._close_pass()


class Pass:
    """One sampling pass (one batch, first pass or hires): its variants, conds, token maps and engine."""

    def __init__(self, run: Run, denoiser: Any, cond: Any):
        p = run.p
        self.run = run
        self.denoiser = denoiser
        self.model = shared.sd_model
        self.hires = bool(getattr(p, "is_hr_pass", False))
        if self.model.model.conditioning_key == "crossattn-adm":
            raise CLoRARuntimeError("CLoRA does not support unCLIP checkpoints")
        check_single_conds([len(c) for c in cond.batch])
        args = run.args
        composition = args.composition()
        prompts, negatives = (p.hr_prompts, p.hr_negative_prompts) if self.hires else (p.prompts, p.negative_prompts)
        try:
            self.plan = plan_variants(composition, prompts, negatives)
        except ValueError as e:
            raise CLoRARuntimeError(f"CLoRA: {e}") from None
        self.loras = {c.lora: lora_bridge.load(c.lora) for c in args.concepts}
        schedule = self._schedule(p)
        self.conds = encoding.encode(self.plan, self.loras, schedule)
        self.cond_ends = [[int(c.end_at_step) for c in conds] for conds in self.conds]
        tokenizer = encoding.host_tokenizer()
        self.token_maps = []
        for variants in self.plan.variants:
            schedules = schedule.prompt_schedules([v.prompt for v in variants])
            self.token_maps.append(token_map_schedule(composition, variants, tokenizer, schedules))
        images, n_variants = len(prompts), self.plan.n_variants
        self.rows = ProxyRows(images, n_variants)
        self.empty = self.model.cond_stage_model_empty_prompt
        # k-diffusion samplers (LCM's included) hand the model x_t / sqrt(abar); the timestep ones x_t
        self.k_diffusion = isinstance(denoiser.sampler, sd_samplers_kdiffusion.KDiffusionSampler)
        sampler = samplers.support(self._func_name(denoiser))
        self.updates = not self.hires and sampler.updates
        if self.hires:
            run.note("hires pass: masks and routing only, no latent updates")
        elif not self.updates:
            run.note(f"sampler {p.sampler_name!r} {sampler.reason}: masks and fusion only, no latent updates")
        else:
            steps = denoiser.total_steps
            calls = steps - 1 if sampler.one_step_fewer else None
            for message in schedule_notes(args.engine_settings().schedule, steps, calls, len(composition.content)):
                run.note(message)
        # this pass's device copies of the cached (CPU) deltas: gone with the pass
        param = next(self.model.model.diffusion_model.parameters())
        unet_deltas = {name: lora_bridge.on_device(lora.unet, param.device, param.dtype) for name, lora in self.loras.items()}
        variant_loras = [
            [LoRAUse(name, unet_deltas[name], weight) for name, weight in lora_set] for lora_set in self.plan.unet_loras
        ]
        hooks = EngineHooks(on_refine=self._on_refine, interrupted=_interrupted, warn=run.note)
        self.engine = CLoRAEngine(
            self.model.model.diffusion_model, variant_loras, self.token_maps[0][0][1], args.engine_settings(), hooks
        )
        self.engine.__enter__()
        # Interrupt/Skip stop a (gradient) UNet pass between blocks, not only between passes
        unet = self.model.model.diffusion_model
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        self._stops = [block.register_forward_pre_hook(_stop_if_interrupted) for block in blocks]

    def _schedule(self, p: Any) -> encoding.Schedule:
        if self.hires:
            config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
            steps = p.hr_second_pass_steps or p.steps
            hires_steps = config.total_steps(steps) if config else steps
            return encoding.Schedule(p.firstpass_steps, hires_steps, p.hr_upscale_to_x, p.hr_upscale_to_y)
        return encoding.Schedule(p.firstpass_steps, None, p.width, p.height)

    @staticmethod
    def _func_name(denoiser: Any) -> str | None:
        func = getattr(denoiser.sampler, "funcname", None)
        return getattr(func, "__name__", func)

    def serves(self, denoiser: Any) -> bool:
        return denoiser is self.denoiser and shared.sd_model is self.model

    def _on_refine(self, i: int, n: int) -> None:
        state.textinfo = f"CLoRA refine {i}/{n}"

    def _cond_table(self, step: int) -> ConditioningTable:
        """Conds of every (uncond, variant, image) row at ``step``, stacked in ProxyRows.table_index order."""
        plan = self.plan
        rows = []
        for jobs in (plan.cond_job, plan.uncond_job):
            for v in range(plan.n_variants):
                for image in range(len(jobs)):
                    j = jobs[image][v]
                    rows.append(self.conds[j][pick_segment(self.cond_ends[j], step)].cond)
        # the host runs cond and uncond at their own lengths unless told to pad them
        pad = shared.opts.pad_cond_uncond or getattr(shared.opts, "pad_cond_uncond_v0", False)
        return ConditioningTable(rows, self.empty if pad else None)

    def step(self, denoiser: Any, x: torch.Tensor, sigma: torch.Tensor, image_cond: torch.Tensor) -> torch.Tensor:
        step = denoiser.step
        maps = [segments[pick_segment([e for e, _ in segments], step)][1] for segments in self.token_maps]
        previews = not self.hires and self.run.args.previews

        def on_group(group: list[int], out: Any) -> None:
            self.run.previews.record(self.run.p.iteration, group, out, maps[group[0]], self.plan)

        textinfo = state.textinfo
        try:
            return fused_step(
                self.engine, denoiser.inner_model, self.rows, x, sigma, image_cond, self._cond_table(step), maps,
                step, denoiser.total_steps, self.k_diffusion, self.updates, on_group if previews else None,
            )
        finally:
            state.textinfo = textinfo

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


def _interrupted() -> bool:
    return bool(state.interrupted or state.skipped)


def _stop_if_interrupted(module: Any, args: Any) -> None:
    if _interrupted():
        raise sd_samplers_common.InterruptedException
