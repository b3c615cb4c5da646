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

``Generations`` owns the lifecycle: ``begin`` (the script's ``process``) opens a
generation, and it is closed in one place, ``Generations.close_any``, when the host
closes ``p``. A pass (one batch's sampling) takes its hooks off the model when
sampling raises, when the next pass starts, or when its generation closes. Every
access to the host goes through ``host``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import traceback
from typing import Any, Callable, Sequence

import torch

from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, LoRAUse, update_summary
from ..update import schedule_notes
from . import encoding, host, infotext, lora_bridge, samplers
from .params import CLoRAArgs, CLoRAArgsError, parse_args
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
from .settings import row_cap, settings_defaults


class RequestRefused(host.RefusalBase):
    """A request CLoRA cannot run, as the host's API answers it: 422 with the message.

    An HTTPException, because the host prints a full backtrace in its console for any
    other exception; the message is printed here once instead.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class HostError(host.RefusalBase):
    """An unexpected error inside a CLoRA pass (a host function that changed, a failing adapter, ...),
    as the API answers it: 500 with one line naming CLoRA, the host and its version; the traceback
    goes to the console once."""

    def __init__(self, message: str):
        super().__init__(status_code=500, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def refused(error: BaseException, host_label: str) -> BaseException:
    """The host-facing form of an error inside a CLoRA pass: CLoRA's own refusals answer 422 with
    their message; any other Exception answers 500 with one line (``HostError``); the host's own
    interruptions (BaseException, not Exception) and errors already in that form pass unchanged."""
    if isinstance(error, (CLoRARuntimeError, CLoRAArgsError)):
        message = str(error) if str(error).startswith("CLoRA") else f"CLoRA: {error}"
        print(f"{message} (request refused)")
        return RequestRefused(message)
    if not isinstance(error, Exception) or isinstance(error, host.RefusalBase):
        return error
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    message = (f"CLoRA on {host_label} failed: {type(error).__name__}: {text}. The traceback is in the "
               "console; please report it with the host's version")
    traceback.print_exception(type(error), error, error.__traceback__)
    print(message)
    return HostError(message)


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


def check_host() -> None:
    """Refuse host setups whose UNet is not the ldm/sgm module CLoRA hooks into."""
    label = host.replaced_unet_label()  # a replaced UNet (TensorRT, ...) never runs our layers
    if label is not None:
        raise CLoRARuntimeError(
            f"CLoRA: the UNet is replaced by {label!r} (e.g. TensorRT); set Settings > SD UNet to None to use CLoRA"
        )


def begin(p: Any, args: Sequence[Any]) -> None:
    """The script's ``process``: parse the request and open its generation.

    Errors in the arguments cannot be raised here (the host logs and swallows script
    exceptions in ``process``): a generation opened with the error fails at its first
    model call, which fails the request (HTTP 422 through the API), so a request that
    asks for CLoRA is never run without it.
    """
    generations.close_any()  # what a run that never closed its p left open (X/Y/Z plot's copies)
    try:
        parsed = parse_args(args, settings_defaults())
    except CLoRAArgsError as e:
        if wants_clora(args):
            generations.open(p, None, e)
        return
    if not parsed.enabled:
        return
    if not parsed.concepts:
        print("CLoRA: enabled without any concept row (subject + LoRA); nothing to do")
        return
    try:
        check_host()
        if not (host.is_txt2img(p) or host.is_img2img(p)):
            raise CLoRARuntimeError(f"CLoRA: {type(p).__name__} is neither txt2img nor img2img; CLoRA runs in those two")
        refuse_refiner(p)
        units = host.controlnet_units_enabled(p)
        if units:
            raise CLoRARuntimeError(controlnet_message(f"ControlNet unit {units[0]} is enabled"))
        for concept in parsed.concepts:
            lora_bridge.on_disk(concept.lora)  # fail early, naming a LoRA that is missing
    except CLoRARuntimeError as e:
        generations.open(p, None, e)
        return
    host.set_generation_param(p, infotext.KEY, infotext.dump(parsed))
    generations.open(p, parsed)


def refuse_refiner(p: Any) -> None:
    """The refiner switch loads another checkpoint part way, which the concepts' LoRAs do not fit
    (both glues: the Forge family keeps A1111's switch)."""
    if host.uses_refiner(p):
        raise CLoRARuntimeError("CLoRA: the refiner switch is not supported; turn the refiner off to use CLoRA")


def controlnet_message(what: str) -> str:
    # its UNet hook cannot tell CLoRA's variant rows cond from uncond, and it runs the UNet's
    # encoder without gradients, so the latent updates would silently do nothing
    return (f"CLoRA: {what}; CLoRA does not run together with ControlNet yet. "
            "Disable the ControlNet units or CLoRA")


def previews_of(p: Any) -> list:
    """The script's ``postprocess``: the gallery previews of ``p``'s generation (none when off)."""
    generation = generations.serving(p)
    if generation is None or generation.args is None or not generation.args.previews:
        return []
    return generation.previews.images()


def wants_clora(args: Sequence[Any]) -> bool:
    if not args:
        return False
    first = args[0]
    return bool(first.get("enabled", True)) if isinstance(first, dict) else bool(first)


class Generations:
    """The owner of CLoRA generations: at most one is open, opened by ``open`` and closed
    only by ``close_any``, when the host closes its ``p`` (after success or failure) or when
    the next generation starts. ``make(p, args, error)`` builds a generation: each glue
    (A1111, Forge) has its own ``Generation`` and shares this owner."""

    def __init__(self, make: Callable[[Any, CLoRAArgs | None, Exception | None], Any]) -> None:
        self._make = make
        self._open: Any = None

    def open(self, p: Any, args: CLoRAArgs | None, error: Exception | None = None) -> Any:
        self.close_any()
        generation = self._make(p, args, error)
        self._open = generation
        host.on_close(p, lambda: self.close_any(p))
        return generation

    def serving(self, p: Any) -> Any:
        """The open generation of ``p``, if any."""
        generation = self._open
        return generation if generation is not None and p is not None and generation.p is p else None

    def close_any(self, p: Any = None) -> None:
        """Close the open generation (only ``p``'s when given); idempotent."""
        generation = self._open
        if generation is None or (p is not None and generation.p is not p):
            return
        self._open = None
        generation.close()


generations = Generations(lambda p, args, error: Generation(p, args, error))


class GenerationState:
    """One CLoRA generation (all batches, both passes), for both glues: its arguments (or the error
    that refuses it), notes, previews and current pass (the glue's own, with ``close()``)."""

    def __init__(self, p: Any, args: CLoRAArgs | None, error: Exception | None):
        self.p = p
        self.args = args
        self.error = error
        self.notes: list[str] = []
        self.previews = PreviewStore()
        self._pass: Any = None

    def note(self, message: str) -> None:
        """Said once in the console and recorded in the infotext entry."""
        message = message.removeprefix("CLoRA: ")
        if message in self.notes:
            return
        self.notes.append(message)
        print(f"CLoRA: {message}")
        host.set_generation_param(self.p, infotext.KEY, infotext.dump(self.args, self.notes))

    def close_pass(self) -> None:
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def close(self) -> None:
        self.close_pass()


class Generation(GenerationState):
    """The A1111 generation: its passes run inside the host's CFG denoiser (``forward``)."""

    def forward(self, original, denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.error is not None:
            raise refused(self.error, host.host_label())
        if host.interrupted():  # the host's forward raises InterruptedException
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
        facts = host.pass_facts(p)
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
        hooks = EngineHooks(on_refine=_on_refine, interrupted=host.interrupted, warn=generation.note)
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
        iteration = host.batch_iteration(generation.p)

        def on_group(group: list[int], out: Any) -> None:
            generation.previews.record(iteration, group, out, maps[group[0]], self.plan)

        with host.progress_text_kept():
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
    host.set_progress_text(f"CLoRA refine {i}/{n}")


def _stop_if_interrupted(module: Any, args: Any) -> None:
    if host.interrupted():
        host.raise_interrupted()
